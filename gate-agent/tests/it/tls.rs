//! MQTT over TLS (`[mqtt.tls]`): the agent talks to the broker through a TLS-terminating proxy
//! (as to Mosquitto's TLS listener), with certificates generated here; no private key is committed.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use afc_domain::model::Direction;
use afc_domain::wire::{DecisionKind, ReaderReply};
use afc_test_support::pki::TestCa;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::harness::*;

/// Writes `ca.pem` (a fresh test CA) to `dir` and returns a server configuration presenting a
/// certificate for `localhost` and `127.0.0.1` signed by it.
fn test_pki(dir: &Path) -> Arc<rustls::ServerConfig> {
    let ca = TestCa::new("").unwrap();
    let leaf = ca.leaf(&["localhost", "127.0.0.1"]).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let chain = vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    )
}

/// Connections a [`tls_proxy`] accepted, and how many completed the TLS handshake.
#[derive(Default)]
struct ProxyCounts {
    accepted: AtomicU64,
    handshakes: AtomicU64,
}

/// A TLS-terminating proxy on a free port in front of `upstream`.
async fn tls_proxy(config: Arc<rustls::ServerConfig>, upstream: SocketAddr) -> (u16, Arc<ProxyCounts>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let counts = Arc::new(ProxyCounts::default());
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let count = counts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            count.accepted.fetch_add(1, Ordering::Relaxed);
            let (acceptor, count) = (acceptor.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                count.handshakes.fetch_add(1, Ordering::Relaxed);
                let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    (port, counts)
}

#[tokio::test]
async fn over_tls_the_gate_is_born_uploads_its_taps_and_gets_them_acked() {
    let pki = tempfile::tempdir().unwrap();
    let server = test_pki(pki.path());
    let broker = free_port();
    start_broker(broker).await;
    let (proxy, handshakes) = tls_proxy(server, format!("127.0.0.1:{broker}").parse().unwrap()).await;
    let controller = Controller::connect(broker).await;
    let plc = plc().await;
    let tls = format!("[mqtt.tls]\nca_file = \"{}\"\n", pki.path().join("ca.pem").display());
    let agent = Agent::start_with(proxy, &plc, &tls).await;
    agent.seed_defaults();
    eventually("the gate's birth through the TLS proxy", || {
        controller.status.lock().unwrap().iter().any(|s| s.contains("\"online\":true")).then_some(())
    })
    .await;
    assert!(handshakes.handshakes.load(Ordering::Relaxed) >= 1);
    let mut reader = agent.reader().await;
    let r = reader.tap(&svc_tap(Direction::Entry, card(3104_0000_0000_3000, 1000, None))).await.unwrap();
    assert!(matches!(r, ReaderReply::Response(ref r) if r.decision == DecisionKind::OpenEntry), "{r:?}");
    let g = agent.running.gate.clone();
    eventually("the tap to be uploaded and acked", || {
        (controller.ledger_len() == 1 && g.store().depth() == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_broker_whose_certificate_the_gate_does_not_trust_gets_no_mqtt_session() {
    let pki = tempfile::tempdir().unwrap();
    let server = test_pki(pki.path());
    // The agent trusts another CA than the one that signed the proxy's certificate.
    let other = tempfile::tempdir().unwrap();
    let _ = test_pki(other.path());
    let broker = free_port();
    start_broker(broker).await;
    let (proxy, handshakes) = tls_proxy(server, format!("127.0.0.1:{broker}").parse().unwrap()).await;
    let controller = Controller::connect(broker).await;
    let plc = plc().await;
    let tls = format!("[mqtt.tls]\nca_file = \"{}\"\n", other.path().join("ca.pem").display());
    let agent = Agent::start_with(proxy, &plc, &tls).await;
    // The agent retries only after an attempt failed: by its third attempt, two handshakes have
    // ended, and none of them succeeded.
    eventually("three connection attempts", || {
        (handshakes.accepted.load(Ordering::Relaxed) >= 3).then_some(())
    })
    .await;
    assert_eq!(handshakes.handshakes.load(Ordering::Relaxed), 0);
    assert!(!agent.running.metrics.mqtt_connected.load(Ordering::Relaxed));
    assert!(controller.status.lock().unwrap().is_empty(), "the gate reached the broker");
}

#[tokio::test]
async fn a_tls_section_naming_a_missing_ca_file_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        1883,
        "127.0.0.1:5020".parse().unwrap(),
        "127.0.0.1:7700".parse().unwrap(),
        "[mqtt.tls]\nca_file = \"/nonexistent/ca.pem\"\n",
    );
    let config = gate_agent::config::Config::load(&path).unwrap();
    let err = config.mqtt_tls().unwrap_err().to_string();
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
}
