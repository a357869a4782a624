//! A test device over real MQTT (rumqttc): connects with credentials (plain or TLS pinned to the
//! appliance's CA), and turns the event loop into a channel of received publishes and the end
//! of the connection.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use tokio::sync::mpsc;

/// What the test sees of a connection.
#[derive(Debug)]
pub enum Seen {
    Connected(rumqttc::ConnectReturnCode),
    Subscribed,
    /// A SUBACK refusing the subscription (return code 0x80).
    SubscribeRefused,
    Message {
        topic: String,
        payload: Vec<u8>,
    },
    Closed(String),
}

pub struct Device {
    pub client: AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Seen>,
    /// PUBACKs received so far (acknowledged QoS 1 publishes).
    pub acked: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A rustls client config trusting the appliance's generated CA (ring provider).
pub fn tls_config(data_dir: &std::path::Path) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(data_dir.join("certs/ca.pem")).unwrap()
    {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(hangar::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// [`tls_config`] presenting a client certificate (PEM chain and PKCS#8 key).
pub fn tls_config_with_cert(
    data_dir: &std::path::Path,
    cert_pem: &str,
    key_pem: &str,
) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(data_dir.join("certs/ca.pem")).unwrap()
    {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(hangar::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

impl Device {
    /// Connects; `tls` = Some(data_dir) for MQTTS (host must be "localhost").
    pub async fn connect(
        port: u16,
        client_id: &str,
        creds: Option<(&str, &str)>,
        tls: Option<&std::path::Path>,
    ) -> Device {
        Device::connect_with(port, client_id, creds, tls.map(tls_config)).await
    }

    /// Connects over MQTTS with this TLS client config (a client certificate, say); plain MQTT
    /// without one.
    pub async fn connect_with(
        port: u16,
        client_id: &str,
        creds: Option<(&str, &str)>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Device {
        let mut o = MqttOptions::new(client_id, "localhost", port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(4 << 20, 4 << 20);
        if let Some((u, p)) = creds {
            o.set_credentials(u, p);
        }
        if let Some(cfg) = tls {
            o.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(cfg),
            ));
        }
        let (client, mut ev) = AsyncClient::new(o, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let acks = acked.clone();
        let task = tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(c))) => {
                        let _ = tx.send(Seen::Connected(c.code));
                    }
                    Ok(Event::Incoming(Packet::SubAck(a))) => {
                        let refused = a
                            .return_codes
                            .iter()
                            .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                        let _ = tx.send(if refused {
                            Seen::SubscribeRefused
                        } else {
                            Seen::Subscribed
                        });
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Seen::Message {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                        });
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Seen::Closed(e.to_string()));
                        return;
                    }
                }
            }
        });
        Device {
            client,
            rx,
            acked,
            task,
        }
    }

    /// Waits for the next event, failing the test after `secs`.
    pub async fn next(&mut self, secs: u64) -> Seen {
        tokio::time::timeout(Duration::from_secs(secs), self.rx.recv())
            .await
            .expect("no MQTT event in time")
            .expect("event loop ended")
    }

    /// Waits for CONNACK; panics on anything else.
    pub async fn expect_connected(&mut self) {
        match self.next(10).await {
            Seen::Connected(rumqttc::ConnectReturnCode::Success) => {}
            other => panic!("expected a successful CONNACK, got {other:?}"),
        }
    }

    /// Subscribes and waits for the SUBACK.
    pub async fn subscribe(&mut self, topic: &str) {
        self.client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            match self.next(10).await {
                Seen::Subscribed => return,
                Seen::SubscribeRefused => panic!("subscription to {topic} refused"),
                Seen::Closed(e) => panic!("closed while subscribing to {topic}: {e}"),
                _ => {}
            }
        }
    }

    /// Subscribes and expects the server to refuse it with a failure SUBACK.
    pub async fn expect_subscribe_refused(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            match self.next(10).await {
                Seen::SubscribeRefused => return,
                Seen::Subscribed => panic!("subscription to {filter} was granted"),
                Seen::Closed(e) => panic!("closed instead of refusing {filter}: {e}"),
                _ => {}
            }
        }
    }

    /// Publishes JSON at QoS 1.
    pub async fn publish(&self, topic: &str, payload: serde_json::Value) {
        self.client
            .publish(
                topic,
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&payload).unwrap(),
            )
            .await
            .unwrap();
    }

    /// Publishes at QoS 1 what the server must refuse: it is acknowledged (MQTT 3.1.1 has no
    /// refusal of a PUBLISH) and dropped, and the connection stays open.
    pub async fn publish_refused(&mut self, topic: &str, payload: serde_json::Value) {
        let before = self.acked.load(std::sync::atomic::Ordering::SeqCst);
        self.publish(topic, payload).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.acked.load(std::sync::atomic::Ordering::SeqCst) <= before {
            match tokio::time::timeout(Duration::from_millis(20), self.rx.recv()).await {
                Ok(Some(Seen::Closed(e))) => {
                    panic!("closed instead of dropping the publish on {topic}: {e}")
                }
                Ok(None) => panic!("event loop ended"),
                _ => {}
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no PUBACK for {topic}"
            );
        }
    }

    /// The next application message (skipping acks), parsed as JSON.
    pub async fn message(&mut self, secs: u64) -> (String, serde_json::Value) {
        loop {
            match self.next(secs).await {
                Seen::Message { topic, payload } => {
                    return (topic, serde_json::from_slice(&payload).unwrap());
                }
                Seen::Closed(e) => panic!("connection closed while waiting for a message: {e}"),
                _ => {}
            }
        }
    }

    /// Waits until the connection is closed by the server.
    pub async fn expect_closed(&mut self, secs: u64) -> String {
        loop {
            if let Seen::Closed(e) = self.next(secs).await {
                return e;
            }
        }
    }
}
