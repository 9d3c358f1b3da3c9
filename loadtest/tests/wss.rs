//! `wss://` end to end: a real `pubgate` serving TLS with a certificate from a throwaway CA (rcgen),
//! and the tool trusting that CA through `--tls-ca` for its subscribers and its HTTPS publishers.

mod support;

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use support::{Server, run_tool, run_tool_status, tmp};

/// A CA (`ca.pem`) and a server pair signed by it (`tls.crt`, `tls.key`) for localhost and
/// 127.0.0.1, in a fresh directory; removed on drop.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn new(name: &str) -> Certs {
        let dir = tmp(name).with_extension("d");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, "loadtest test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("leaf key");
        let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        leaf.subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        leaf.distinguished_name.push(DnType::CommonName, "pubgate");
        leaf.extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
        let cert = leaf.signed_by(&key, &issuer).expect("leaf cert");
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("ca.pem");
        std::fs::write(
            dir.join("tls.crt"),
            format!("{}{}", cert.pem(), ca_cert.pem()),
        )
        .expect("tls.crt");
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("tls.key");
        Certs { dir }
    }

    fn path(&self, f: &str) -> String {
        self.dir.join(f).display().to_string()
    }

    fn server(&self) -> Server {
        let (cert, key) = (self.path("tls.crt"), self.path("tls.key"));
        Server::start_with(&[
            ("PUBGATE__TLS__CERT", cert.as_str()),
            ("PUBGATE__TLS__KEY", key.as_str()),
        ])
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn with_json(args: &[&str], name: &str) -> serde_json::Value {
    let json = tmp(name);
    let r = run_tool(args, &json);
    let _ = std::fs::remove_file(Path::new(&json));
    r
}

#[test]
fn connect_over_wss() {
    let certs = Certs::new("wss-connect");
    let server = certs.server();
    // By IP (the certificate's IP SAN) and by name (its DNS SAN).
    let port = server.addr.rsplit(':').next().unwrap().to_string();
    let by_ip = format!("wss://127.0.0.1:{port}/ws");
    let by_name = format!("wss://localhost:{port}/ws");
    let (ca, pid) = (certs.path("ca.pem"), server.pid());
    for url in [&by_ip, &by_name] {
        let r = with_json(
            &[
                "connect",
                "--url",
                url,
                "--tls-ca",
                &ca,
                "--server-pid",
                &pid,
                "--connections",
                "30",
                "--hold",
                "1",
                "--settle",
                "0.5",
            ],
            "wss-connect",
        );
        assert_eq!(r["params"]["tls"], true, "{:#}", r["params"]);
        let res = &r["result"];
        assert_eq!(res["established"], 30, "{res:#}");
        assert_eq!(res["failed_total"], 0, "{res:#}");
        assert_eq!(res["alive_at_end_of_hold"], 30, "{res:#}");
    }
}

#[test]
fn fanout_over_wss_with_https_publishers_loses_nothing() {
    let certs = Certs::new("wss-fanout");
    let server = certs.server();
    let url = format!("wss://{}/ws", server.addr);
    let (ca, pid) = (certs.path("ca.pem"), server.pid());
    // 12 subscribers over 3 topics (4 each), 150 publishes over HTTPS: 600 deliveries.
    let r = with_json(
        &[
            "fanout",
            "--url",
            &url,
            "--tls-ca",
            &ca,
            "--server-pid",
            &pid,
            "--subscribers",
            "12",
            "--topics",
            "3",
            "--rate",
            "75",
            "--duration",
            "2",
            "--warmup",
            "0",
            "--publishers",
            "2",
            "--drain",
            "5",
        ],
        "wss-fanout",
    );
    assert_eq!(r["params"]["tls"], true, "{:#}", r["params"]);
    let p = &r["result"]["phase"];
    assert_eq!(p["publish"]["path"], "http", "{p:#}");
    assert_eq!(p["publish"]["ok"], 150, "{p:#}");
    assert_eq!(p["expected"], 600, "{p:#}");
    assert_eq!(p["delivered"], 600, "{p:#}");
    assert_eq!(p["lost"], 0, "{p:#}");
    assert_eq!(p["counters"]["duplicates"], 0, "{p:#}");
    assert_eq!(p["counters"]["bad_frames"], 0, "{p:#}");
}

#[test]
fn churn_over_wss_closes_cleanly() {
    let certs = Certs::new("wss-churn");
    let server = certs.server();
    let url = format!("wss://{}/ws", server.addr);
    let (ca, pid) = (certs.path("ca.pem"), server.pid());
    let r = with_json(
        &[
            "churn",
            "--url",
            &url,
            "--tls-ca",
            &ca,
            "--server-pid",
            &pid,
            "--subscribers",
            "6",
            "--topics",
            "2",
            "--rate",
            "20",
            "--duration",
            "2",
            "--warmup",
            "0",
            "--publishers",
            "1",
            "--churn-rate",
            "10",
            "--churn-life",
            "0.5",
            "--churn-drop-pct",
            "50",
        ],
        "wss-churn",
    );
    let res = &r["result"];
    assert_eq!(res["steady"]["lost"], 0, "{res:#}");
    assert_eq!(res["churn"]["established"], 20, "{res:#}");
    assert_eq!(res["churn"]["ends"]["left"], 20, "{res:#}");
}

#[test]
fn wss_needs_a_ca_and_the_right_one() {
    let certs = Certs::new("wss-ca");
    let other = Certs::new("wss-other-ca");
    let server = certs.server();
    let url = format!("wss://{}/ws", server.addr);
    let (ok, err) = run_tool_status(&["connect", "--url", &url, "--connections", "1"], None);
    assert!(!ok, "{err}");
    assert!(
        err.contains("needs --tls-ca FILE"),
        "no clear message: {err}"
    );
    // Trusting another CA: every handshake fails, and the report says so.
    let wrong = other.path("ca.pem");
    let r = with_json(
        &[
            "connect",
            "--url",
            &url,
            "--tls-ca",
            &wrong,
            "--connections",
            "5",
            "--hold",
            "0.5",
            "--settle",
            "0",
        ],
        "wss-wrong-ca",
    );
    let res = &r["result"];
    assert_eq!(res["established"], 0, "{res:#}");
    assert_eq!(res["failed"]["tls_io"], 5, "{res:#}");
}
