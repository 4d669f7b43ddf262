//! Plain HTTP/1 client plumbing shared by the admin client and `wsdrain prestop`: one
//! connection per call to an `http://` endpoint, its task aborted when the call ends.

use http_body_util::BodyExt;
use hyper::Uri;
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Where an `http://host:port/prefix` URL points.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `host:port` as written, for the Host header and messages.
    pub authority: String,
    host: String,
    port: u16,
    /// The path prefix without a trailing `/`.
    pub prefix: String,
}

impl Endpoint {
    pub fn parse(uri: &Uri) -> Result<Endpoint, &'static str> {
        if uri.scheme_str() != Some("http") {
            return Err("only http:// is supported");
        }
        let authority = uri.authority().ok_or("no host")?;
        Ok(Endpoint {
            authority: authority.to_string(),
            // Uri::host keeps the brackets of an IPv6 literal; the resolver wants it bare.
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: authority.port_u16().unwrap_or(80),
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    pub async fn connect(&self) -> std::io::Result<TcpStream> {
        TcpStream::connect((self.host.as_str(), self.port)).await
    }

    /// The request target for `path` below the prefix.
    pub fn target(&self, path: &str) -> String {
        format!("{}{path}", self.prefix)
    }
}

/// The connection task; aborted on drop so it never outlives the call (e.g. a timeout).
pub struct ConnTask(tokio::task::JoinHandle<()>);

impl Drop for ConnTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// HTTP/1 handshake on an open stream.
pub async fn handshake<B>(stream: TcpStream) -> Result<(SendRequest<B>, ConnTask), hyper::Error>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, ConnTask(task)))
}

/// Reads at most `limit` bytes of the body. Returns the bytes and whether the body ended
/// within the limit; stops reading as soon as it goes past.
pub async fn read_limited(
    mut body: Incoming,
    limit: usize,
) -> Result<(Vec<u8>, bool), hyper::Error> {
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            let room = limit - buf.len();
            if data.len() > room {
                buf.extend_from_slice(&data[..room]);
                return Ok((buf, false));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok((buf, true))
}
