//! Admission latency over TLS: the built `wsdrain webhook --self-signed` on loopback, driven
//! at a fixed rate with keep-alive connections. Prints figures; asserts nothing.
//!
//! `cargo bench --bench webhook` (env: WSDRAIN_BENCH_RATE=500, WSDRAIN_BENCH_SECS=10,
//! WSDRAIN_BENCH_CONNS=4, WSDRAIN_BENCH_BIN=path of another wsdrain build to measure). Latency is measured from the moment each request is due and
//! handed to the connection pool, so a stalled server shows up as queueing instead of
//! hiding it (no coordinated omission); the schedule is absolute, so lateness never drifts.
//!
//! A second part times admissions on fresh connections (TCP + TLS + POST, as the API
//! server does after an idle connection closed), first alone, then beside 1024 idle TLS
//! connections holding every connection slot: the webhook must evict the quietest and
//! answer within the goal (1 s; the API server gives up after 5 s).

#[path = "../tests/common/bench.rs"]
#[allow(dead_code)]
mod bench;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::sync::{Mutex, mpsc};

const GOAL_P99: Duration = Duration::from_millis(2);
const WARMUP: Duration = Duration::from_secs(1);
const GOAL_FRESH_UNDER_FLOOD: Duration = Duration::from_secs(1);
const IDLE_FLOOD: usize = 1024;
const FRESH_SAMPLES: usize = 20;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn b64decode(s: &str) -> Vec<u8> {
    use base64::prelude::{BASE64_STANDARD, Engine as _};
    BASE64_STANDARD
        .decode(s)
        .unwrap_or_else(|e| panic!("not base64 ({e}): {s}"))
}

fn main() {
    let rate = env_num("WSDRAIN_BENCH_RATE", 500).max(1);
    let secs = env_num("WSDRAIN_BENCH_SECS", 10).clamp(1, 120);
    let conns = env_num("WSDRAIN_BENCH_CONNS", 4).clamp(1, 64) as usize;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    // WSDRAIN_BENCH_BIN measures another build (e.g. the image's release binary).
    let bin = std::env::var("WSDRAIN_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_wsdrain").to_owned());
    println!("server binary {bin}");
    let mut server = Command::new(&bin)
        .args(["--log-format", "text", "webhook", "--self-signed"])
        .args(["--san", "127.0.0.1", "--native-sidecars", "true"])
        .args(["--listen", &addr.to_string()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn wsdrain webhook");
    let mut line = String::new();
    let stdout = server.stdout.take().expect("stdout");
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("caBundle line");
    let bundle = b64decode(line.trim().trim_start_matches("caBundle: "));
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bundle) {
        roots.add(cert.expect("CA PEM")).expect("root");
    }

    let body = Bytes::from(
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/admission/pod-create.json"),
        )
        .expect("fixture"),
    );

    // One client thread: the server has the other core(s).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (result, fresh) = rt.block_on(async {
        let mut run = drive(addr, roots.clone(), body.clone(), rate, secs, conns).await;
        run.server_mean = server_mean(addr, roots.clone()).await;
        let alone = fresh_admissions(addr, &roots, &body).await;
        let idle = idle_flood(addr, &roots).await;
        let flooded = fresh_admissions(addr, &roots, &body).await;
        drop(idle);
        (run, (alone, flooded))
    });
    let _ = server.kill();
    let _ = server.wait();
    report(result, rate, secs, conns);
    report_fresh(fresh.0, fresh.1);
}

/// `FRESH_SAMPLES` admissions, each on a new connection; latency from TCP connect to the
/// whole answer (None: no 200 within 10 s).
async fn fresh_admissions(
    addr: std::net::SocketAddr,
    roots: &RootCertStore,
    body: &Bytes,
) -> Vec<Option<Duration>> {
    let mut out = Vec::with_capacity(FRESH_SAMPLES);
    for _ in 0..FRESH_SAMPLES {
        let start = Instant::now();
        let call = async {
            let mut sender = connect(addr, roots.clone()).await;
            let req = http::Request::post("/mutate")
                .header(http::header::HOST, "127.0.0.1")
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body.clone()))
                .ok()?;
            let resp = sender.send_request(req).await.ok()?;
            let ok = resp.status() == 200;
            resp.into_body().collect().await.ok()?;
            ok.then(|| start.elapsed())
        };
        out.push(
            tokio::time::timeout(Duration::from_secs(10), call)
                .await
                .ok()
                .flatten(),
        );
    }
    out
}

/// `IDLE_FLOOD` completed TLS handshakes that never send a request.
async fn idle_flood(
    addr: std::net::SocketAddr,
    roots: &RootCertStore,
) -> Vec<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_root_certificates(roots.clone())
        .with_no_client_auth(),
    );
    let mut idle = Vec::with_capacity(IDLE_FLOOD);
    for _ in 0..IDLE_FLOOD {
        let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
            continue;
        };
        if let Ok(tls) = tokio_rustls::TlsConnector::from(config.clone())
            .connect(ServerName::from(addr.ip()), tcp)
            .await
        {
            idle.push(tls);
        }
    }
    idle
}

fn report_fresh(alone: Vec<Option<Duration>>, flooded: Vec<Option<Duration>>) {
    let summary = |runs: &[Option<Duration>]| {
        let mut ok: Vec<Duration> = runs.iter().flatten().copied().collect();
        ok.sort();
        (
            pct(&ok, 0.5),
            ok.last().copied().unwrap_or_default(),
            runs.len() - ok.len(),
        )
    };
    let (p50_alone, max_alone, failed_alone) = summary(&alone);
    let (p50_flood, max_flood, failed_flood) = summary(&flooded);
    println!("fresh-connection admissions ({FRESH_SAMPLES} each: TCP + TLS + POST)");
    println!(
        "  alone                      p50 {:.3} ms   max {:.3} ms   failed {failed_alone}",
        p50_alone.as_secs_f64() * 1e3,
        max_alone.as_secs_f64() * 1e3
    );
    println!(
        "  beside {IDLE_FLOOD} idle TLS conns   p50 {:.3} ms   max {:.3} ms   failed {failed_flood}   (p50 ratio {:.2})",
        p50_flood.as_secs_f64() * 1e3,
        max_flood.as_secs_f64() * 1e3,
        p50_flood.as_secs_f64() / p50_alone.as_secs_f64().max(1e-9)
    );
    let verdict = if failed_flood == 0 && max_flood <= GOAL_FRESH_UNDER_FLOOD {
        "MET"
    } else {
        "MISSED"
    };
    println!(
        "  goal        every fresh admission beside the idle flood within {:?}: {verdict}",
        GOAL_FRESH_UNDER_FLOOD
    );
}

struct Run {
    latencies: Vec<Duration>,
    errors: u64,
    elapsed: Duration,
    patched: bool,
    /// Mean time inside the webhook (its own histogram), all requests incl. warm-up.
    server_mean: Option<Duration>,
}

async fn connect(
    addr: std::net::SocketAddr,
    roots: RootCertStore,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocols")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let end = Instant::now() + Duration::from_secs(20);
    let tcp = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => break s,
            Err(e) if Instant::now() > end => panic!("webhook not listening: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::from(addr.ip()), tcp)
        .await
        .expect("TLS");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("http1");
    tokio::spawn(conn);
    sender
}

async fn drive(
    addr: std::net::SocketAddr,
    roots: RootCertStore,
    body: Bytes,
    rate: u64,
    secs: u64,
    conns: usize,
) -> Run {
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let warmup_n = (WARMUP.as_nanos() / interval.as_nanos()) as u64;
    let total = warmup_n + rate * secs;
    let (tx, rx) = mpsc::channel::<(u64, Instant)>(total as usize);
    let rx = Arc::new(Mutex::new(rx));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u64, Option<Duration>, bool)>();

    for _ in 0..conns {
        let mut sender = connect(addr, roots.clone()).await;
        let (rx, done_tx, body, roots) = (rx.clone(), done_tx.clone(), body.clone(), roots.clone());
        tokio::spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                let Some((i, scheduled)) = next else { return };
                let req = http::Request::post("/mutate")
                    .header(http::header::HOST, "127.0.0.1")
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(body.clone()))
                    .expect("request");
                let outcome = match sender.send_request(req).await {
                    Ok(resp) if resp.status() == 200 => match resp.into_body().collect().await {
                        Ok(b) => {
                            let b = b.to_bytes();
                            Some(has_patch(&b))
                        }
                        Err(_) => None,
                    },
                    _ => None,
                };
                let lat = scheduled.elapsed();
                let _ = done_tx.send((i, outcome.map(|_| lat), outcome.unwrap_or(false)));
                if outcome.is_none() {
                    // The connection may be gone; open a new one so the run goes on.
                    sender = connect(addr, roots.clone()).await;
                }
            }
        });
    }
    drop(done_tx);

    let start = Instant::now();
    tokio::spawn(async move {
        for i in 0..total {
            let at = start + interval * i as u32;
            tokio::time::sleep_until(at.into()).await;
            // Stamp the real dispatch time: the timer's own ~1 ms lateness is the
            // client's, but waiting for a free connection after this counts.
            if tx.send((i, Instant::now())).await.is_err() {
                return;
            }
        }
    });

    let measured_from = start + interval * warmup_n as u32;
    let mut run = Run {
        latencies: Vec::with_capacity((rate * secs) as usize),
        errors: 0,
        elapsed: Duration::ZERO,
        patched: false,
        server_mean: None,
    };
    let mut last = measured_from;
    while let Some((i, lat, patched)) = done_rx.recv().await {
        if i < warmup_n {
            continue;
        }
        last = Instant::now();
        run.patched |= patched;
        match lat {
            Some(l) => run.latencies.push(l),
            None => run.errors += 1,
        }
    }
    run.elapsed = last.saturating_duration_since(measured_from);
    run
}

/// Sum / count of the webhook's latency histogram, from its /metrics.
async fn server_mean(addr: std::net::SocketAddr, roots: RootCertStore) -> Option<Duration> {
    let mut sender = connect(addr, roots).await;
    let req = http::Request::get("/metrics")
        .header(http::header::HOST, "127.0.0.1")
        .body(Full::new(Bytes::new()))
        .ok()?;
    let text = sender
        .send_request(req)
        .await
        .ok()?
        .into_body()
        .collect()
        .await
        .ok()?
        .to_bytes();
    let text = String::from_utf8_lossy(&text);
    let value = |name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    let sum = value("wsdrain_webhook_admission_duration_seconds_sum ")?;
    let count = value("wsdrain_webhook_admission_duration_seconds_count ")?;
    (count > 0.0).then(|| Duration::from_secs_f64(sum / count))
}

/// Whether the answer carried a patch (the injector may still be a stub).
fn has_patch(body: &[u8]) -> bool {
    body.windows(b"\"patchType\"".len())
        .any(|w| w == b"\"patchType\"")
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn report(mut run: Run, rate: u64, secs: u64, conns: usize) {
    run.latencies.sort();
    let n = run.latencies.len();
    let p50 = pct(&run.latencies, 0.50);
    let p99 = pct(&run.latencies, 0.99);
    let max = run.latencies.last().copied().unwrap_or_default();
    let tput = n as f64 / run.elapsed.as_secs_f64().max(1e-9);
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "optimized"
    };
    println!(
        "webhook admission benchmark ({profile} client build, TLS 1.3 loopback, {conns} keep-alive connections)"
    );
    println!("  offered     {rate} req/s for {secs} s (+{WARMUP:?} warm-up), pod-create.json");
    println!(
        "  completed   {n} ok, {} errors, patch returned: {}",
        run.errors, run.patched
    );
    println!("  throughput  {tput:.0} req/s");
    println!(
        "  latency     p50 {:.3} ms   p99 {:.3} ms   max {:.3} ms",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
    if let Some(mean) = run.server_mean {
        println!(
            "  in webhook  mean {:.3} ms per admission (its own histogram)",
            mean.as_secs_f64() * 1e3
        );
    }
    println!("  machine     {}", bench::machine());
    let verdict = if p99 <= GOAL_P99 && run.errors == 0 {
        "MET"
    } else {
        "MISSED"
    };
    println!(
        "  goal        p99 <= {:.1} ms with no errors: {verdict}",
        GOAL_P99.as_secs_f64() * 1e3
    );
}
