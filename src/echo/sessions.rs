//! The app's own registry of open WebSocket sessions.
//!
//! hyper forgets a connection once it is upgraded, so an app that wants to close its
//! WebSockets on request has to keep its own list. Each session task owns its socket and
//! listens on a oneshot channel for "close yourself with this frame"; the registry only
//! holds those senders.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[derive(Default)]
pub struct Sessions {
    next_id: AtomicU64,
    // BTreeMap: drain closes the oldest sessions first, in a stable order.
    open: Mutex<BTreeMap<u64, oneshot::Sender<CloseFrame>>>,
}

impl Sessions {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, oneshot::Sender<CloseFrame>>> {
        // A panic elsewhere while holding the lock leaves the map consistent: keep going.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn open_count(&self) -> u64 {
        self.lock().len() as u64
    }

    /// Asks up to `max` open sessions to close with `code`/`reason`. They leave the
    /// registry at once (a session in its closing handshake is no longer "open").
    /// Returns (closed, remaining).
    pub fn drain(&self, max: u64, code: u16, reason: &str) -> (u64, u64) {
        let mut open = self.lock();
        let mut closed = 0;
        while closed < max {
            let Some((_, tx)) = open.pop_first() else {
                break;
            };
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            };
            // A send fails only if the session ended on its own just now: not counted.
            if tx.send(frame).is_ok() {
                closed += 1;
            }
        }
        (closed, open.len() as u64)
    }

    fn register(&self) -> (u64, oneshot::Receiver<CloseFrame>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, tx);
        (id, rx)
    }

    fn forget(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Runs one echo session until the client leaves or a drain closes it.
    /// `close_timeout` bounds how long we wait for the client's half of the closing
    /// handshake before dropping the TCP connection.
    pub async fn serve<S>(&self, mut ws: WebSocketStream<S>, close_timeout: Duration)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (id, mut close_rx) = self.register();
        tracing::debug!(session = id, "session opened");
        let ended_by = loop {
            tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => {
                        if let Err(err) = ws.send(msg).await {
                            break format!("send failed: {err}");
                        }
                    }
                    // tungstenite answers pings and the client's close frame by itself;
                    // keep polling so those replies get flushed, until the stream ends.
                    Some(Ok(_)) => {}
                    Some(Err(err)) => break format!("read failed: {err}"),
                    None => break "client closed".to_owned(),
                },
                Ok(frame) = &mut close_rx => {
                    let code = u16::from(frame.code);
                    let finished = tokio::time::timeout(close_timeout, async {
                        ws.close(Some(frame)).await.ok()?;
                        // Read until the client's close frame arrives and the stream ends.
                        while let Some(Ok(_)) = ws.next().await {}
                        Some(())
                    })
                    .await;
                    break match finished {
                        Ok(_) => format!("closed by drain ({code})"),
                        Err(_) => format!("closed by drain ({code}); client never finished the handshake, TCP dropped"),
                    };
                }
            }
        };
        self.forget(id);
        tracing::debug!(session = id, ended_by, "session ended");
    }
}
