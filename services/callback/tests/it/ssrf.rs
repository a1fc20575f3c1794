//! Delivery-time refusals: what passed the allowlist by name is still checked by address.

use jetcall::allowlist::{Allowlist, CallbackUrl};
use jetcall::config::CallbackConfig;
use jetcall::signing::{Signer, SigningKey};

use callback::deliver::{Sender, Verdict};
use testkit::WebhookReceiver;

fn sender(allowlist: &[&str]) -> Sender {
    let allowlist = Allowlist::parse(allowlist).expect("allowlist");
    Sender::new(&CallbackConfig::default(), allowlist).expect("sender")
}

fn signer() -> Signer {
    Signer::from_secrets([SigningKey::generate().as_str()]).expect("signer")
}

async fn deliver(sender: &Sender, url: &str) -> (Verdict, jetcall::status::DeliveryAttempt) {
    let url = CallbackUrl::parse(url).expect("a callback URL");
    sender
        .send(&url, "msg_test", b"{}", &signer(), 0, None)
        .await
}

#[tokio::test]
async fn addresses_are_checked_whatever_the_name() {
    let receiver = WebhookReceiver::start().await;
    let port = receiver.port();
    let by_name = sender(&["localhost", "*.shop.example"]);
    let refusals = [
        // Allowed by name, resolves to loopback.
        (format!("http://localhost:{port}/cb"), "loopback"),
        // Literal addresses the allowlist does not name, however they are written.
        (format!("http://127.0.0.1:{port}/cb"), "allowlist"),
        (format!("http://2130706433:{port}/cb"), "allowlist"),
        (format!("http://[::ffff:127.0.0.1]:{port}/cb"), "allowlist"),
        (
            "http://169.254.169.254/latest/meta-data/".to_owned(),
            "allowlist",
        ),
    ];
    for (url, rule) in refusals {
        let (verdict, attempt) = deliver(&by_name, &url).await;
        assert!(
            matches!(&verdict, Verdict::Stop(reason) if reason.contains(rule)),
            "{url}: {verdict:?}"
        );
        assert_eq!(attempt.error_kind.as_deref(), Some("refused"), "{url}");
    }
    assert!(
        receiver.deliveries().is_empty(),
        "no request reached the receiver"
    );
}

#[tokio::test]
async fn an_explicit_address_or_range_is_an_exemption() {
    let receiver = WebhookReceiver::start().await;
    let exempt = sender(&["127.0.0.0/8"]);
    let (verdict, attempt) = deliver(&exempt, &receiver.url("/cb")).await;
    assert_eq!(verdict, Verdict::Delivered, "{attempt:?}");
    assert_eq!(attempt.status_code, Some(204));

    // `localhost` also resolves to ::1, which the range does not cover: the name is refused.
    let port = receiver.port();
    let named = sender(&["localhost", "127.0.0.0/8"]);
    let (verdict, _) = deliver(&named, &format!("http://localhost:{port}/cb")).await;
    if resolves_to_ipv6_loopback().await {
        assert!(
            matches!(&verdict, Verdict::Stop(reason) if reason.contains("::1")),
            "{verdict:?}"
        );
    } else {
        assert_eq!(verdict, Verdict::Delivered);
    }
}

async fn resolves_to_ipv6_loopback() -> bool {
    tokio::net::lookup_host(("localhost", 0))
        .await
        .map(|mut addrs| addrs.any(|addr| addr.is_ipv6()))
        .unwrap_or(false)
}
