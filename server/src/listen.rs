//! The connection loop of `motif serve`: what axum::serve does, plus the
//! limits it has no setting for. A client must send each request's headers
//! within `header_timeout` (counted from the connection's start or from the
//! previous answer, so an idle keep-alive connection closes after it too); a
//! request body may not stall longer than `body_timeout`; and one client
//! address holds at most `max_per_address` connections, further ones being
//! closed as they are accepted. Without these, clients that open connections
//! and never finish a request hold them, and file handles, for ever.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower_http::add_extension::AddExtension;
use tower_http::timeout::RequestBodyTimeout;

use crate::accounts::client_key;

/// Timeouts for slow clients and the per-address connection cap.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Time to send a request's headers, from connecting or from the previous answer.
    pub header_timeout: Duration,
    /// Longest pause while a request body arrives.
    pub body_timeout: Duration,
    /// Open connections from one client address (IPv6 by /64).
    pub max_per_address: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_per_address: 64,
        }
    }
}

/// Open connections per client key; a [`Slot`] gives its one back when dropped.
#[derive(Default)]
struct PerAddress {
    open: Mutex<HashMap<String, usize>>,
}

struct Slot {
    table: Arc<PerAddress>,
    key: String,
}

impl PerAddress {
    fn take(table: &Arc<PerAddress>, peer: SocketAddr, max: usize) -> Option<Slot> {
        let key = client_key(peer.ip());
        let mut open = table.open.lock().ok()?;
        let count = open.entry(key.clone()).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Slot {
            table: table.clone(),
            key,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.table.open.lock() {
            if let Some(count) = open.get_mut(&self.key) {
                *count -= 1;
                if *count == 0 {
                    open.remove(&self.key);
                }
            }
        }
    }
}

/// Serves `app` on `listener` until `stop` resolves, then lets the open
/// connections finish their requests (as axum::serve's graceful shutdown).
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &ConnectionLimits,
    stop: impl Future<Output = ()>,
) -> Result<()> {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let table = Arc::new(PerAddress::default());
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file handles, mostly: wait for some to close
                    // instead of spinning on the error.
                    eprintln!("motif serve: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        // Over the cap the connection is closed at once, before any byte of
        // it is read: the client sees its connection refused, not an answer.
        let Some(slot) = PerAddress::take(&table, peer, limits.max_per_address) else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = AddExtension::new(
            RequestBodyTimeout::new(app.clone(), limits.body_timeout),
            ConnectInfo(peer),
        );
        let connection = graceful.watch(
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service)),
        );
        tokio::spawn(async move {
            // A client that times out or goes away ends its connection with
            // an error; there is nobody to tell.
            let _ = connection.await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
