//! A small HTTP/1.1 server (plain and TLS) for transfer tests.
//!
//! Routes: `GET /` → a greeting naming the server; `GET /bytes/N` → N bytes of
//! [`crate::pattern`]; `PUT|POST /upload` (Content-Length body, `Expect: 100-continue`
//! honoured) → the body's SHA-256 in hex. One request per connection.

use std::{net::Ipv4Addr, path::Path, sync::Arc};

use sha2::Digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

/// Creates the test CA (written to `dir/ca.pem`) and a server certificate it signs for
/// `example.test`, `*.example.test` and `ips`.
pub fn tls_acceptor(dir: &Path, ips: &[Ipv4Addr]) -> TlsAcceptor {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "childflow test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();

    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["example.test".into(), "*.example.test".into()]).unwrap();
    params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress((*ip).into())));
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    let cert = params.signed_by(&key, &issuer).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone(), ca_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

pub async fn serve(listener: tokio::net::TcpListener, tls: Option<TlsAcceptor>) {
    let name = listener.local_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    while let Ok((stream, _)) = listener.accept().await {
        let tls = tls.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            match tls {
                Some(acceptor) => {
                    if let Ok(s) = acceptor.accept(stream).await {
                        let _ = handle(s, &name).await;
                    }
                }
                None => {
                    let _ = handle(stream, &name).await;
                }
            }
        });
    }
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, name: &str) -> std::io::Result<()> {
    // Read the head (request line and headers).
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.lines();
    let mut request = lines.next().unwrap_or_default().split_whitespace();
    let (method, path) = (request.next().unwrap_or(""), request.next().unwrap_or(""));
    let header = |key: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(key).then(|| v.trim().to_owned())
        })
    };
    if method == "GET" && path == "/" {
        let body = format!("hello from {name}\n");
        respond(&mut s, "200 OK", body.as_bytes()).await
    } else if method == "GET"
        && let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<usize>().ok())
    {
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nContent-Type: application/octet-stream\r\n\
             Connection: close\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await?;
        // Stream the pattern in chunks aligned to its period.
        let chunk = crate::pattern(251 * 256);
        let mut left = n;
        while left > 0 {
            let take = left.min(chunk.len());
            s.write_all(&chunk[..take]).await?;
            left -= take;
        }
        s.shutdown().await
    } else if (method == "PUT" || method == "POST") && path == "/upload" {
        let len: u64 = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        if header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
            s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = len;
        while left > 0 {
            let want = buf.len().min(left as usize);
            let got = s.read(&mut buf[..want]).await?;
            if got == 0 {
                break;
            }
            hasher.update(&buf[..got]);
            left -= got as u64;
        }
        let hex: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        respond(&mut s, "200 OK", format!("{hex}\n").as_bytes()).await
    } else {
        respond(&mut s, "404 Not Found", b"not found\n").await
    }
}

async fn respond<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    s.shutdown().await
}
