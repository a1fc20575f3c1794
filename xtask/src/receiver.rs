//! The demo's webhook receiver: what a Jetcall customer would run, checking each
//! delivery's Standard Webhooks signature.

use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use standardwebhooks::Webhook;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const PATH: &str = "/webhooks/description";

/// One webhook request as it arrived.
#[derive(Debug)]
pub struct Delivery {
    pub body: Bytes,
    pub headers: HeaderMap,
    /// `Err` holds why the signature did not verify.
    pub signature: Result<(), String>,
    pub received_at: Instant,
}

#[derive(Debug)]
pub struct Receiver {
    /// The callback URL to give the gateway.
    pub url: String,
    pub deliveries: mpsc::UnboundedReceiver<Delivery>,
    server: JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

struct Shared {
    webhook: Webhook,
    // Unbounded so a slow reader never makes the handler hold a delivery open: the
    // demo expects a handful of requests at most.
    deliveries: mpsc::UnboundedSender<Delivery>,
}

/// Listens on a free loopback port, verifying signatures made with `signing_secret`.
pub async fn start(signing_secret: &str) -> anyhow::Result<Receiver> {
    let webhook = Webhook::new(signing_secret).context("the webhook signing secret is invalid")?;
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        webhook,
        deliveries: tx,
    });
    let app = Router::new().route(PATH, post(receive)).with_state(shared);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the webhook receiver")?;
    let addr = listener
        .local_addr()
        .context("reading the receiver's address")?;
    let server = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            eprintln!("the webhook receiver stopped: {error}");
        }
    });
    Ok(Receiver {
        url: format!("http://{addr}{PATH}"),
        deliveries: rx,
        server,
    })
}

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let received_at = Instant::now();
    let signature = shared
        .webhook
        .verify(&body, &headers)
        .map_err(|error| error.to_string());
    let status = if signature.is_ok() {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::UNAUTHORIZED
    };
    // A send fails only once the demo has stopped reading; the sender's answer stands.
    let _ = shared.deliveries.send(Delivery {
        body,
        headers,
        signature,
        received_at,
    });
    status
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::http::HeaderMap;
    use standardwebhooks::Webhook;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    async fn post(url: &str, body: &'static str, headers: HeaderMap) -> reqwest::StatusCode {
        let response = reqwest::Client::new()
            .post(url)
            .headers(headers)
            .body(body)
            .send()
            .await
            .expect("the receiver answers");
        response.status()
    }

    fn signed_headers(secret: &str, body: &str) -> HeaderMap {
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_secs();
        let timestamp = i64::try_from(timestamp).expect("a timestamp fits in i64");
        let signature = Webhook::new(secret)
            .expect("a valid secret")
            .sign("msg_1", timestamp, body.as_bytes())
            .expect("signing works");
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", "msg_1".parse().expect("a header value"));
        headers.insert(
            "webhook-timestamp",
            timestamp.to_string().parse().expect("a header value"),
        );
        headers.insert(
            "webhook-signature",
            signature.parse().expect("a header value"),
        );
        headers
    }

    #[tokio::test]
    async fn accepts_a_good_signature_and_refuses_a_bad_one() {
        let mut receiver = super::start(SECRET).await.expect("the receiver starts");
        let body = r#"{"job_id":"JOB-771"}"#;

        let good = signed_headers(SECRET, body);
        assert_eq!(post(&receiver.url, body, good).await, 204);
        let delivery = tokio::time::timeout(Duration::from_secs(5), receiver.deliveries.recv())
            .await
            .expect("a delivery arrives")
            .expect("the channel is open");
        assert_eq!(delivery.signature, Ok(()));
        assert_eq!(&delivery.body[..], body.as_bytes());

        let forged = signed_headers("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", body);
        assert_eq!(post(&receiver.url, body, forged).await, 401);
        let delivery = receiver
            .deliveries
            .recv()
            .await
            .expect("the channel is open");
        assert!(delivery.signature.is_err());
    }
}
