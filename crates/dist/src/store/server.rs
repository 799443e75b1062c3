//! The store server: one thread accepts connections, one thread per client serves its
//! requests. Blocking requests wait on a condition variable that every change notifies, so
//! a waiting client wakes as soon as the key it needs appears.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::error::StoreError;
use super::protocol::{read_frame, write_frame, Request, Response};

/// A running key-value store, listening until dropped.
///
/// Dropping it stops accepting, closes every client connection (their pending and later
/// calls fail with [`StoreError::ConnectionLost`]) and wakes every blocked request.
pub struct StoreServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

struct Shared {
    table: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
    closing: AtomicBool,
    /// Clones of open client sockets, so shutdown can unblock their reader threads.
    connections: Mutex<HashMap<u64, TcpStream>>,
    next_connection: AtomicU64,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, HashMap<String, Vec<u8>>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn connections(&self) -> MutexGuard<'_, HashMap<u64, TcpStream>> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }
}

impl StoreServer {
    /// Listens on `host:port`; port 0 picks a free port (see [`StoreServer::port`]).
    pub fn bind(host: &str, port: u16) -> Result<Self, StoreError> {
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| StoreError::Resolve {
                host: host.to_string(),
                reason: e.to_string(),
            })?
            .collect();
        let Some(first) = addrs.first() else {
            return Err(StoreError::Resolve {
                host: host.to_string(),
                reason: "it has no addresses".into(),
            });
        };
        let listener = TcpListener::bind(first).map_err(|e| match e.kind() {
            io::ErrorKind::AddrInUse => StoreError::PortInUse {
                addr: host.to_string(),
                port,
            },
            _ => StoreError::Listen {
                addr: host.to_string(),
                port,
                source: e,
            },
        })?;
        let local_addr = listener.local_addr().map_err(|e| StoreError::Listen {
            addr: host.to_string(),
            port,
            source: e,
        })?;
        let shared = Arc::new(Shared {
            table: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            closing: AtomicBool::new(false),
            connections: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(0),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name("ff-dist-store-accept".into())
            .spawn(move || accept_loop(listener, accept_shared))
            .map_err(|e| StoreError::Listen {
                addr: host.to_string(),
                port,
                source: e,
            })?;
        Ok(Self {
            local_addr,
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// Hosts the store that MASTER_ADDR:MASTER_PORT names. A loopback MASTER_ADDR is bound
    /// as is (nothing outside this machine needs it); any other is served on every interface,
    /// as torchrun does, because MASTER_ADDR is how other machines reach this one and may not
    /// be an address this machine can bind (NAT, a load balancer, a DNS alias).
    pub fn host_master(master_addr: &str, port: u16) -> Result<Self, StoreError> {
        let resolved: Vec<SocketAddr> = (master_addr, port)
            .to_socket_addrs()
            .map_err(|e| StoreError::Resolve {
                host: master_addr.to_string(),
                reason: e.to_string(),
            })?
            .collect();
        let wildcard = match resolved.first() {
            Some(addr) if addr.ip().is_loopback() => return Self::bind(master_addr, port),
            Some(SocketAddr::V6(_)) => "::",
            _ => "0.0.0.0",
        };
        // Report the address the user set, not the wildcard it stands for here.
        Self::bind(wildcard, port).map_err(|e| match e {
            StoreError::PortInUse { port, .. } => StoreError::PortInUse {
                addr: master_addr.to_string(),
                port,
            },
            other => other,
        })
    }

    /// The port it listens on (the chosen one when bound with port 0).
    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        // Take the table lock so no waiter is between its check and its wait when notified.
        drop(self.shared.table());
        self.shared.changed.notify_all();
        for stream in self.shared.connections().values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        // accept() has no timeout; a connection of our own wakes it to see `closing`.
        let mut wake = self.local_addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(handle) = self.accept_thread.take() {
            let _ = handle.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.closing() {
            break;
        }
        let Ok(stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
        let Ok(registered) = stream.try_clone() else {
            continue;
        };
        shared.connections().insert(id, registered);
        let connection_shared = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name("ff-dist-store-client".into())
            .spawn(move || {
                serve_connection(stream, &connection_shared);
                connection_shared.connections().remove(&id);
            });
        if spawned.is_err() {
            shared.connections().remove(&id);
        }
    }
}

/// Serves requests until the client disconnects, sends something malformed, or the server
/// shuts down. A malformed request closes that connection only.
fn serve_connection(mut stream: TcpStream, shared: &Shared) {
    loop {
        let payload = match read_frame(&mut stream) {
            Ok(Some(payload)) => payload,
            Ok(None) | Err(_) => return,
        };
        let Ok(request) = Request::decode(&payload) else {
            return;
        };
        let Some(response) = execute(request, shared) else {
            return;
        };
        if write_frame(&mut stream, &response.encode()).is_err() {
            return;
        }
    }
}

/// Carries out one request; `None` when the server began shutting down while it waited.
fn execute(request: Request, shared: &Shared) -> Option<Response> {
    let response = match request {
        Request::Set { key, value } => {
            shared.table().insert(key, value);
            shared.changed.notify_all();
            Response::Done
        }
        Request::Get { key, timeout } => {
            let keys = [key];
            let table = wait_for(shared, &keys, timeout)?;
            match table.get(&keys[0]) {
                Some(value) => Response::Value(value.clone()),
                None => Response::TimedOut {
                    missing: keys.to_vec(),
                },
            }
        }
        Request::TryGet { key } => match shared.table().get(&key) {
            Some(value) => Response::Value(value.clone()),
            None => Response::Missing,
        },
        Request::Wait { keys, timeout } => {
            let table = wait_for(shared, &keys, timeout)?;
            let missing: Vec<String> = keys
                .iter()
                .filter(|k| !table.contains_key(*k))
                .cloned()
                .collect();
            if missing.is_empty() {
                Response::Done
            } else {
                Response::TimedOut { missing }
            }
        }
        Request::Add { key, delta } => add(shared, key, delta),
        Request::CompareSet {
            key,
            expected,
            desired,
        } => {
            let mut table = shared.table();
            let current = table.get(&key);
            if current.map(Vec::as_slice) == expected.as_deref() {
                table.insert(key, desired);
                drop(table);
                shared.changed.notify_all();
                Response::Swapped
            } else {
                Response::Mismatch {
                    current: current.cloned(),
                }
            }
        }
        Request::Delete { key } => {
            let deleted = shared.table().remove(&key).is_some();
            shared.changed.notify_all();
            Response::Deleted(deleted)
        }
        Request::NumKeys => Response::Count(shared.table().len() as u64),
    };
    Some(response)
}

/// Counters are stored as decimal text, so `get` on a counter reads naturally.
fn add(shared: &Shared, key: String, delta: i64) -> Response {
    let mut table = shared.table();
    let current = match table.get(&key) {
        None => 0,
        Some(bytes) => match std::str::from_utf8(bytes)
            .ok()
            .and_then(|text| text.parse::<i64>().ok())
        {
            Some(value) => value,
            None => {
                return Response::Refused(format!(
                    "key '{key}' holds a value that is not a decimal integer, so add cannot count on it"
                ))
            }
        },
    };
    let Some(updated) = current.checked_add(delta) else {
        return Response::Refused(format!(
            "adding {delta} to key '{key}' ({current}) overflows a 64-bit integer"
        ));
    };
    table.insert(key, updated.to_string().into_bytes());
    drop(table);
    shared.changed.notify_all();
    Response::Counter(updated)
}

/// Blocks until every key exists, the timeout passes, or the server shuts down (`None`).
fn wait_for<'a>(
    shared: &'a Shared,
    keys: &[String],
    timeout: Duration,
) -> Option<MutexGuard<'a, HashMap<String, Vec<u8>>>> {
    let table = shared.table();
    let (table, _) = shared
        .changed
        .wait_timeout_while(table, timeout, |table| {
            !shared.closing() && !keys.iter().all(|k| table.contains_key(k))
        })
        .unwrap_or_else(PoisonError::into_inner);
    if shared.closing() {
        None
    } else {
        Some(table)
    }
}
