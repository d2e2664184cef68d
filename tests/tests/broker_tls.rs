//! RabbitMQ's own TLS listener: the dispatcher and an agent over `amqps://` straight to the
//! broker, verified against `tls.ca_file`.
//!
//! The shared broker gets a TLS listener on a free port for the test, at run time
//! (`rabbit_networking:start_ssl_listener`, no restart), and loses it afterwards. That is a
//! change to a shared service, so the test is named `serial_*` and runs alone.

use gantry_tests::tls::TestCa;
use gantry_tests::{AgentOpts, Stack};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

/// Stops the listener however the test ends.
struct Listener(u16);

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args([
                "eval",
                &format!("rabbit_networking:stop_tcp_listener({}).", self.0),
            ])
            .output();
    }
}

fn start_tls_listener(port: u16, cert: &str, key: &str) -> Listener {
    let erl = format!(
        "rabbit_networking:start_ssl_listener({port}, [{{certfile, \"{cert}\"}}, {{keyfile, \"{key}\"}}, {{versions, ['tlsv1.2', 'tlsv1.3']}}], 1)."
    );
    let out = Command::new("rabbitmqctl")
        .args(["eval", &erl])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.trim() == "ok",
        "start_ssl_listener: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Listener(port)
}

#[tokio::test]
async fn serial_the_dispatcher_and_an_agent_speak_amqps_to_rabbitmqs_own_tls_listener() {
    // Arrange: a certificate the broker (user rabbitmq) can read, and its TLS listener.
    let ca = TestCa::new("broker").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &ca.server_cert_pem).unwrap();
    std::fs::write(&key, &ca.server_key_pem).unwrap();
    for f in [&cert, &key] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let bundle = ca
        .write_bundle(dir.path(), &[])
        .unwrap()
        .display()
        .to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _listener = start_tls_listener(
        port,
        &cert.display().to_string(),
        &key.display().to_string(),
    );
    let amqps = format!("amqps://guest:guest@127.0.0.1:{port}/%2f");
    let untrusted = gantry_tests::gantry_shared::amqp::connect(
        &amqps,
        lapin::ConnectionProperties::default(),
        None,
    )
    .await;

    // Act
    let mut stack = Stack::start_with(vec![
        ("GANTRY__AMQP__URL".into(), amqps.clone()),
        ("GANTRY__TLS__CA_FILE".into(), bundle.clone()),
    ])
    .await
    .unwrap();
    stack
        .add_agent(
            "amqps",
            AgentOpts {
                env: vec![
                    ("GANTRY__AMQP__URL".into(), amqps.clone()),
                    ("GANTRY__TLS__CA_FILE".into(), bundle.clone()),
                ],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let task = stack
        .submit("name = \"amqps\"\n[[steps]]\nname = \"s\"\nscript = \"echo through the broker tls listener\"\n")
        .await
        .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();
    // rabbitmqctl answers from the connections themselves (the management API's listing lags).
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "user", "port", "ssl"])
        .output()
        .unwrap();
    let conns: Vec<(String, String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some((
                f.next()?.to_owned(),
                f.next()?.to_owned(),
                f.next()?.to_owned(),
            ))
        })
        .collect();

    // Assert
    let Err(e) = untrusted else {
        panic!("no CA, no connection")
    };
    let e = e.to_string();
    assert!(
        e.contains("UnknownIssuer") || e.contains("certificate"),
        "{e}"
    );
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    let over_tls: Vec<&(String, String, String)> = conns
        .iter()
        .filter(|(_, p, ssl)| *p == port.to_string() && ssl == "true")
        .collect();
    assert!(
        over_tls.len() >= 2,
        "the dispatcher's and the agent's connections are TLS ones on port {port}: {conns:?}"
    );
    assert!(
        over_tls.iter().any(|(u, _, _)| u.contains(".worker.")),
        "the agent logged in as its own broker user over TLS"
    );
}
