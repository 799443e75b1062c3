//! The store client: one TCP connection, one request at a time (a mutex orders callers from
//! several threads), every call bounded in time.

use std::io;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use super::error::StoreError;
use super::protocol::{read_frame, write_frame, Request, Response};

/// How long a request that does not wait (set, add, ...) may take before the store is
/// considered unreachable. The server answers those at once; this only bounds a network
/// that silently dropped the connection.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Extra time allowed beyond a blocking request's own timeout for the reply to arrive.
const REPLY_MARGIN: Duration = Duration::from_secs(10);

/// Pause between connection attempts while the store is not up yet.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// The outcome of [`StoreClient::compare_set`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareSet {
    /// The key held the expected value (or was absent, when absence was expected) and now
    /// holds the desired one.
    Swapped,
    /// The key held something else, shown here (`None`: it was absent); nothing changed.
    Mismatch { current: Option<Vec<u8>> },
}

/// A connection to a [`StoreServer`](super::StoreServer). Share it between threads with an
/// `Arc`; calls from several threads are served one after another.
pub struct StoreClient {
    host: String,
    port: u16,
    local_ip: IpAddr,
    stream: Mutex<TcpStream>,
}

impl std::fmt::Debug for StoreClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreClient({}:{})", self.host, self.port)
    }
}

impl StoreClient {
    /// Connects to the store at `host:port`, retrying while nothing listens there yet (the
    /// hosting process may start after this one) until `timeout` has passed.
    pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<Self, StoreError> {
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| StoreError::Resolve {
                host: host.to_string(),
                reason: e.to_string(),
            })?
            .collect();
        if addrs.is_empty() {
            return Err(StoreError::Resolve {
                host: host.to_string(),
                reason: "it has no addresses".into(),
            });
        }
        let start = Instant::now();
        let deadline = start + timeout;
        let mut last_error = String::from("no connection attempt finished in time");
        loop {
            for addr in &addrs {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    break;
                }
                match TcpStream::connect_timeout(addr, remaining) {
                    Ok(stream) => return Self::from_stream(host, port, stream),
                    Err(e) => last_error = e.to_string(),
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(StoreError::Unreachable {
                    host: host.to_string(),
                    port,
                    waited: start.elapsed(),
                    last_error,
                });
            }
            thread::sleep(RETRY_PAUSE.min(remaining));
        }
    }

    fn from_stream(host: &str, port: u16, stream: TcpStream) -> Result<Self, StoreError> {
        let lost = |e: io::Error| StoreError::ConnectionLost {
            host: host.to_string(),
            port,
            reason: e.to_string(),
        };
        stream.set_nodelay(true).map_err(lost)?;
        let local_ip = stream.local_addr().map_err(lost)?.ip();
        Ok(Self {
            host: host.to_string(),
            port,
            local_ip,
            stream: Mutex::new(stream),
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// This machine's address on the connection to the store: the interface that reaches
    /// node 0, and so a good one for other peers to reach this process on.
    pub fn local_ip(&self) -> IpAddr {
        self.local_ip
    }

    /// Stores `value` under `key`, replacing any earlier value.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let request = Request::Set {
            key: key.to_string(),
            value: value.to_vec(),
        };
        match self.call(&request, REPLY_TIMEOUT)? {
            Response::Done => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }

    /// The value under `key`, waiting up to `timeout` for some process to set it.
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError> {
        let request = Request::Get {
            key: key.to_string(),
            timeout,
        };
        match self.call(&request, timeout.saturating_add(REPLY_MARGIN))? {
            Response::Value(value) => Ok(value),
            Response::TimedOut { missing } => Err(self.timeout(missing, timeout)),
            other => Err(self.unexpected(other)),
        }
    }

    /// The value under `key` if it is set now; never waits.
    pub fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let request = Request::TryGet {
            key: key.to_string(),
        };
        match self.call(&request, REPLY_TIMEOUT)? {
            Response::Value(value) => Ok(Some(value)),
            Response::Missing => Ok(None),
            other => Err(self.unexpected(other)),
        }
    }

    /// Waits up to `timeout` until every key is set; the error names the keys still missing.
    pub fn wait<S: AsRef<str>>(&self, keys: &[S], timeout: Duration) -> Result<(), StoreError> {
        let request = Request::Wait {
            keys: keys.iter().map(|k| k.as_ref().to_string()).collect(),
            timeout,
        };
        match self.call(&request, timeout.saturating_add(REPLY_MARGIN))? {
            Response::Done => Ok(()),
            Response::TimedOut { missing } => Err(self.timeout(missing, timeout)),
            other => Err(self.unexpected(other)),
        }
    }

    /// Adds `delta` to the integer counter under `key` (absent counts as 0) atomically and
    /// returns the new value. Counters read back through `get` as decimal text.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        let request = Request::Add {
            key: key.to_string(),
            delta,
        };
        match self.call(&request, REPLY_TIMEOUT)? {
            Response::Counter(value) => Ok(value),
            Response::Refused(reason) => Err(self.refused(reason)),
            other => Err(self.unexpected(other)),
        }
    }

    /// Atomically replaces the value under `key` with `desired` if it currently equals
    /// `expected`, where `expected: None` means "only if the key is absent".
    pub fn compare_set(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        desired: &[u8],
    ) -> Result<CompareSet, StoreError> {
        let request = Request::CompareSet {
            key: key.to_string(),
            expected: expected.map(<[u8]>::to_vec),
            desired: desired.to_vec(),
        };
        match self.call(&request, REPLY_TIMEOUT)? {
            Response::Swapped => Ok(CompareSet::Swapped),
            Response::Mismatch { current } => Ok(CompareSet::Mismatch { current }),
            other => Err(self.unexpected(other)),
        }
    }

    /// Removes `key`; true if it was there.
    pub fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let request = Request::Delete {
            key: key.to_string(),
        };
        match self.call(&request, REPLY_TIMEOUT)? {
            Response::Deleted(deleted) => Ok(deleted),
            other => Err(self.unexpected(other)),
        }
    }

    /// How many keys the store holds.
    pub fn num_keys(&self) -> Result<u64, StoreError> {
        match self.call(&Request::NumKeys, REPLY_TIMEOUT)? {
            Response::Count(count) => Ok(count),
            other => Err(self.unexpected(other)),
        }
    }

    /// Sends one request and reads its reply. Any I/O failure shuts the connection down:
    /// a late reply would otherwise be read as the answer to the next request.
    fn call(&self, request: &Request, reply_timeout: Duration) -> Result<Response, StoreError> {
        let mut stream = self.stream.lock().unwrap_or_else(PoisonError::into_inner);
        let exchange = |stream: &mut TcpStream| -> io::Result<Response> {
            stream.set_read_timeout(Some(reply_timeout.max(Duration::from_millis(1))))?;
            write_frame(stream, &request.encode())?;
            let payload = read_frame(stream)?.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the store closed the connection",
                )
            })?;
            Response::decode(&payload).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        };
        exchange(&mut stream).map_err(|e| {
            let _ = stream.shutdown(Shutdown::Both);
            StoreError::ConnectionLost {
                host: self.host.clone(),
                port: self.port,
                reason: e.to_string(),
            }
        })
    }

    fn timeout(&self, missing: Vec<String>, waited: Duration) -> StoreError {
        StoreError::Timeout {
            keys: missing,
            waited,
            host: self.host.clone(),
            port: self.port,
        }
    }

    fn refused(&self, reason: String) -> StoreError {
        StoreError::Refused {
            host: self.host.clone(),
            port: self.port,
            reason,
        }
    }

    fn unexpected(&self, response: Response) -> StoreError {
        StoreError::ConnectionLost {
            host: self.host.clone(),
            port: self.port,
            reason: format!("it sent a reply that does not match the request ({response:?})"),
        }
    }
}
