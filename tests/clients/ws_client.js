#!/usr/bin/env node
// WebSocket test client built on the Node `ws` library.
//
// Usage: node ws_client.js URL COUNT TIMEOUT_SECONDS [ignore-close]
//
// Same behaviour and output as ws_client.py: open COUNT connections, send one message on
// each and check the echo, print `READY` once the opening phase is over (failures go to
// "errors"), then wait until the server closed every connection or TIMEOUT_SECONDS pass
// (TIMEOUT_SECONDS also bounds the opening phase), then print ONE JSON line:
//   {"opened":N,"closes":[{"code":1012,"reason":"...","at_ms":T},...],"still_open":k,
//    "errors":[...]}
// at_ms counts from READY (0 if earlier); a connection that ended without a close frame
// from the server reports 1006 (that is what `ws` gives).
//
// ignore-close: `ws` answers a close frame by calling the socket's own close() method, so
// the script replaces that method on each connection with a no-op: no close frame goes
// back, `ws` starts no close timer, and the TCP connection stays open until the server
// drops it. The code and reason of the server's close frame are still reported, at the
// time the TCP connection ended.
'use strict';

const path = require('path');
const WebSocket = require(path.join(__dirname, '..', 'node', 'node_modules', 'ws'));

const CONNECT_PARALLEL = 100;
const MAX_ERRORS = 50;

function usage() {
  process.stderr.write('usage: ws_client.js URL COUNT TIMEOUT_SECONDS [ignore-close]\n');
  process.exit(2);
}

const args = process.argv.slice(2);
if (args.length < 3 || args.length > 4) usage();
const [url, countArg, timeoutArg, mode] = args;
const count = Number.parseInt(countArg, 10);
const timeoutMs = Number.parseFloat(timeoutArg) * 1000;
if (!Number.isInteger(count) || count < 0 || !(timeoutMs >= 0)) usage();
if (mode !== undefined && mode !== 'ignore-close') usage();
const ignoreClose = mode === 'ignore-close';

const errors = [];
const opened = []; // { ws, closed: Promise }
let readyAt = null;

function openOne(i) {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, { handshakeTimeout: timeoutMs });
    const text = `hello ${i}`;
    let settled = false;
    const done = (ok, err) => {
      if (settled) return;
      settled = true;
      if (err) errors.push(`conn ${i}: ${err}`);
      resolve(ok ? ws : null);
    };
    // Registered first so it sees every close, including ones during the opening phase.
    const closed = new Promise((res) => {
      ws.on('close', (code, reason) => {
        const at = readyAt === null ? 0 : Math.max(0, Math.round(performance.now() - readyAt));
        ws.closeInfo = { code, reason: reason.toString('utf8'), at_ms: at };
        res();
        done(false, `closed before the echo arrived (code ${code})`);
      });
    });
    ws.closedPromise = closed;
    ws.on('error', (err) => {
      // After the opening phase an error is followed by 'close' (code 1006): that is the
      // record that counts; only opening errors are listed.
      if (!settled) done(false, `${err.code || 'error'}: ${err.message}`);
    });
    ws.once('open', () => ws.send(text));
    ws.once('message', (data) => {
      const got = data.toString('utf8');
      if (got !== text) {
        errors.push(`conn ${i}: echo mismatch: sent ${JSON.stringify(text)}, got ${JSON.stringify(got)}`);
      }
      if (ignoreClose) ws.close = () => {};
      done(true);
    });
  });
}

async function main() {
  // Connect in waves so thousands of clients don't hit the accept queue at once.
  let next = 0;
  const worker = async () => {
    while (next < count) {
      const i = next++;
      const ws = await openOne(i);
      if (ws) opened.push(ws);
    }
  };
  const workers = Promise.all(Array.from({ length: Math.min(CONNECT_PARALLEL, count) }, worker));
  let openTimer;
  const openTimedOut = await Promise.race([
    workers.then(() => false),
    new Promise((res) => { openTimer = setTimeout(() => res(true), timeoutMs); }),
  ]);
  clearTimeout(openTimer);
  if (openTimedOut) {
    errors.push(`${count - opened.length} connections not open after ${timeoutMs / 1000}s`);
    next = count; // stop starting new ones
  }
  const conns = opened.slice();
  readyAt = performance.now();
  process.stdout.write('READY\n');

  let stillOpen = 0;
  let waitTimer;
  await Promise.race([
    Promise.all(conns.map((ws) => ws.closedPromise)),
    new Promise((res) => { waitTimer = setTimeout(res, timeoutMs); }),
  ]);
  clearTimeout(waitTimer);
  const result = [];
  for (const ws of conns) {
    if (ws.closeInfo) result.push(ws.closeInfo);
    else stillOpen += 1;
  }
  result.sort((a, b) => a.at_ms - b.at_ms);
  let errs = errors;
  if (errs.length > MAX_ERRORS) errs = errs.slice(0, MAX_ERRORS).concat([`... ${errs.length - MAX_ERRORS} more`]);
  process.stdout.write(`${JSON.stringify({ opened: conns.length, closes: result, still_open: stillOpen, errors: errs })}\n`, () => {
    process.exit(0);
  });
}

main().catch((err) => {
  process.stdout.write(`${JSON.stringify({ opened: 0, closes: [], still_open: 0, errors: [`client crashed: ${err.stack || err}`] })}\n`, () => process.exit(0));
});
