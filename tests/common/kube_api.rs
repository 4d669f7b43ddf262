//! kube's tower-test mock of the Kubernetes API server: a client whose every request the
//! test receives, asserts and answers.

use std::pin::Pin;
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::Value;
use tower_test::mock::{self, Handle, SendResponse};

pub type Api = Pin<Box<Handle<Request<Body>, Response<Body>>>>;

/// A client of the mock API, and the test's end of it.
pub fn client() -> (kube::Client, Api) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), Box::pin(handle))
}

/// The next request the client sent; fails the test after 5 s without one.
pub async fn next(api: &mut Api) -> (Request<Body>, SendResponse<Response<Body>>) {
    tokio::time::timeout(Duration::from_secs(5), api.as_mut().next_request())
        .await
        .expect("a request within 5 s")
        .expect("client alive")
}

/// Answers a request with `code` and a JSON body.
pub fn respond(send: SendResponse<Response<Body>>, code: u16, body: &Value) {
    send.send_response(
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).expect("json")))
            .expect("response"),
    );
}
