//! The rendezvous store over real loopback sockets, with clients in several threads.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ff_dist::store::{CompareSet, StoreClient, StoreError, StoreServer};

const SECOND: Duration = Duration::from_secs(1);

fn server() -> StoreServer {
    StoreServer::bind("127.0.0.1", 0).expect("host a store on a free port")
}

fn client(server: &StoreServer) -> StoreClient {
    StoreClient::connect("127.0.0.1", server.port(), SECOND).expect("connect")
}

#[test]
fn clients_share_keys_counters_and_deletions() {
    let server = server();
    let (a, b) = (client(&server), client(&server));

    a.set("greeting", b"hello").unwrap();
    assert_eq!(b.get("greeting", SECOND).unwrap(), b"hello");
    assert_eq!(b.try_get("absent").unwrap(), None);

    assert_eq!(a.add("count", 5).unwrap(), 5);
    assert_eq!(b.add("count", -2).unwrap(), 3);
    assert_eq!(a.get("count", SECOND).unwrap(), b"3");
    let err = a.add("greeting", 1).unwrap_err().to_string();
    assert!(
        err.contains("key 'greeting' holds a value that is not a decimal integer"),
        "{err}"
    );

    assert_eq!(
        a.compare_set("slot", None, b"first").unwrap(),
        CompareSet::Swapped
    );
    assert_eq!(
        b.compare_set("slot", None, b"second").unwrap(),
        CompareSet::Mismatch {
            current: Some(b"first".to_vec())
        }
    );
    assert_eq!(
        b.compare_set("slot", Some(b"first"), b"third").unwrap(),
        CompareSet::Swapped
    );
    assert_eq!(a.get("slot", SECOND).unwrap(), b"third");

    assert_eq!(a.num_keys().unwrap(), 3);
    assert!(b.delete("slot").unwrap());
    assert!(!b.delete("slot").unwrap());
    assert_eq!(a.num_keys().unwrap(), 2);
}

#[test]
fn concurrent_adds_are_atomic() {
    let server = server();
    let port = server.port();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            thread::spawn(move || {
                let c = StoreClient::connect("127.0.0.1", port, SECOND).unwrap();
                for _ in 0..100 {
                    c.add("n", 1).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(client(&server).add("n", 0).unwrap(), 400);
}

#[test]
fn one_client_serves_several_threads() {
    let server = server();
    let shared = Arc::new(client(&server));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let c = Arc::clone(&shared);
            thread::spawn(move || {
                for i in 0..50 {
                    let key = format!("t{t}/{i}");
                    c.set(&key, key.as_bytes()).unwrap();
                    assert_eq!(c.get(&key, SECOND).unwrap(), key.as_bytes());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(shared.num_keys().unwrap(), 200);
}

#[test]
fn wait_and_get_return_as_soon_as_another_thread_sets_the_keys() {
    let server = server();
    let waiter = client(&server);
    let port = server.port();
    let setter = thread::spawn(move || {
        let c = StoreClient::connect("127.0.0.1", port, SECOND).unwrap();
        thread::sleep(Duration::from_millis(200));
        c.set("a", b"1").unwrap();
        thread::sleep(Duration::from_millis(100));
        c.set("b", b"2").unwrap();
    });
    let start = Instant::now();
    waiter.wait(&["a", "b"], Duration::from_secs(10)).unwrap();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(waiter.get("b", Duration::ZERO).unwrap(), b"2");
    setter.join().unwrap();
}

#[test]
fn timeouts_name_the_missing_keys_and_come_on_time() {
    let server = server();
    let c = client(&server);
    c.set("present", b"").unwrap();

    let start = Instant::now();
    let err = c
        .wait(&["present", "rank_7"], Duration::from_millis(300))
        .unwrap_err();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    match &err {
        StoreError::Timeout { keys, .. } => assert_eq!(keys, &["rank_7".to_string()]),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        err.to_string().starts_with(
            "timed out after 0.3s waiting for key 'rank_7' in the rendezvous store at 127.0.0.1:"
        ),
        "{err}"
    );

    let err = c
        .get("never", Duration::from_millis(100))
        .unwrap_err()
        .to_string();
    assert!(err.contains("waiting for key 'never'"), "{err}");
    // The connection is still in step after a timeout.
    assert_eq!(c.get("present", SECOND).unwrap(), b"");
}

#[test]
fn a_port_in_use_is_reported_with_the_fix() {
    let first = server();
    let err = StoreServer::bind("127.0.0.1", first.port())
        .err()
        .expect("the port is taken");
    assert_eq!(
        err.to_string(),
        format!(
            "port {} on 127.0.0.1 is in use; pick another MASTER_PORT",
            first.port()
        )
    );
    let err = StoreServer::host_master("127.0.0.1", first.port())
        .err()
        .expect("taken");
    assert!(matches!(err, StoreError::PortInUse { .. }), "{err}");
}

#[test]
fn a_client_retries_until_the_store_appears() {
    // Reserve a free port, release it, and bring the store up there a little later.
    let port = {
        let probe = server();
        probe.port()
    };
    let starter = thread::spawn(move || {
        thread::sleep(Duration::from_millis(400));
        let server = StoreServer::bind("127.0.0.1", port).expect("the port is free again");
        thread::sleep(Duration::from_secs(2));
        drop(server);
    });
    let start = Instant::now();
    let c = StoreClient::connect("127.0.0.1", port, Duration::from_secs(10)).expect("retries");
    assert!(start.elapsed() >= Duration::from_millis(300));
    c.set("k", b"v").unwrap();
    starter.join().unwrap();
}

#[test]
fn a_client_gives_up_at_its_deadline_naming_the_address() {
    let port = {
        let probe = server();
        probe.port()
    };
    let start = Instant::now();
    let err = StoreClient::connect("127.0.0.1", port, Duration::from_millis(500)).unwrap_err();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "could not reach the rendezvous store at 127.0.0.1:{port} within 0.5s"
        )),
        "{text}"
    );
}

#[test]
fn stopping_the_server_fails_blocked_and_later_calls() {
    let server = server();
    let c = client(&server);
    let blocked = thread::spawn(move || {
        let start = Instant::now();
        let result = c.get("never", Duration::from_secs(30));
        (result, start.elapsed(), c)
    });
    thread::sleep(Duration::from_millis(200));
    drop(server);
    let (result, waited, c) = blocked.join().unwrap();
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    match result {
        Err(StoreError::ConnectionLost { .. }) => {}
        other => panic!("expected a lost connection, got {other:?}"),
    }
    assert!(matches!(
        c.set("k", b"v"),
        Err(StoreError::ConnectionLost { .. })
    ));
}
