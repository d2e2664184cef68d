//! The mutex scripts against the real Redis: order, leases, fencing tokens, and a Redis that
//! lost its data.

use gantry_tests::gantry_shared::locks::{self, Acquire, MutexKeys, Reclaim, Renew};
use gantry_tests::gantry_shared::redis_link::RedisLink;
use std::time::Duration;

const LEASE: Duration = Duration::from_secs(5);

struct Ns(String);

impl Ns {
    fn new() -> Self {
        Ns(format!(
            "lk{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        ))
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let ns = self.0.clone();
        let _ = std::thread::spawn(move || {
            let client = redis::Client::open(gantry_tests::REDIS_URL).unwrap();
            let mut c = client.get_connection().unwrap();
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{ns}.*"))
                .query(&mut c)
                .unwrap();
            if !keys.is_empty() {
                let _: () = redis::cmd("DEL").arg(keys).query(&mut c).unwrap();
            }
        })
        .join();
    }
}

#[tokio::test]
async fn waiters_are_served_in_arrival_order_with_growing_tokens() {
    // Arrange
    let ns = Ns::new();
    let redis = RedisLink::new(gantry_tests::REDIS_URL).unwrap();
    let keys = MutexKeys::new(&ns.0, "db");
    assert_eq!(
        locks::acquire(&redis, &keys, "a", LEASE).await.unwrap(),
        Acquire::NoEpoch
    );
    assert!(
        locks::set_epoch(&redis, &ns.0, 1, Duration::ZERO)
            .await
            .unwrap()
    );

    // Act + Assert
    let Acquire::Granted(t1) = locks::acquire(&redis, &keys, "a", LEASE).await.unwrap() else {
        panic!("the first caller gets the free mutex");
    };
    assert_eq!(t1, (1 << 32) + 1);
    assert_eq!(
        locks::acquire(&redis, &keys, "a", LEASE).await.unwrap(),
        Acquire::Granted(t1),
        "asking again returns the same grant"
    );
    for (w, pos) in [("b", 0), ("c", 1), ("b", 0)] {
        assert_eq!(
            locks::acquire(&redis, &keys, w, LEASE).await.unwrap(),
            Acquire::Waiting {
                holder: "a".into(),
                position: pos
            }
        );
    }
    assert_eq!(
        locks::renew(&redis, &keys, "a", t1, LEASE).await.unwrap(),
        Renew::Held
    );
    assert_eq!(
        locks::renew(&redis, &keys, "b", t1, LEASE).await.unwrap(),
        Renew::Lost
    );
    assert!(
        !locks::release(&redis, &keys, "a", Some(t1 + 7))
            .await
            .unwrap(),
        "wrong token"
    );
    assert!(locks::release(&redis, &keys, "a", Some(t1)).await.unwrap());
    // c arrived after b: c may not jump the queue.
    assert!(matches!(
        locks::acquire(&redis, &keys, "c", LEASE).await.unwrap(),
        Acquire::Waiting { position: 1, .. }
    ));
    let Acquire::Granted(t2) = locks::acquire(&redis, &keys, "b", LEASE).await.unwrap() else {
        panic!("b is next");
    };
    assert!(t2 > t1);
    assert_eq!(
        locks::renew(&redis, &keys, "a", t1, LEASE).await.unwrap(),
        Renew::Lost
    );
    // A waiter that gives up leaves the queue.
    assert!(!locks::release(&redis, &keys, "c", None).await.unwrap());
    assert!(locks::release(&redis, &keys, "b", Some(t2)).await.unwrap());
    assert!(matches!(
        locks::acquire(&redis, &keys, "d", LEASE).await.unwrap(),
        Acquire::Granted(t) if t > t2
    ));
}

#[tokio::test]
async fn a_lease_expires_without_renewal() {
    let ns = Ns::new();
    let redis = RedisLink::new(gantry_tests::REDIS_URL).unwrap();
    let keys = MutexKeys::new(&ns.0, "short");
    locks::set_epoch(&redis, &ns.0, 1, Duration::ZERO)
        .await
        .unwrap();
    let short = Duration::from_millis(300);
    let Acquire::Granted(t) = locks::acquire(&redis, &keys, "a", short).await.unwrap() else {
        panic!()
    };
    assert!(matches!(
        locks::acquire(&redis, &keys, "b", short).await.unwrap(),
        Acquire::Waiting { .. }
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        locks::renew(&redis, &keys, "a", t, short).await.unwrap(),
        Renew::Lost,
        "never re-created"
    );
    assert!(matches!(
        locks::acquire(&redis, &keys, "b", short).await.unwrap(),
        Acquire::Granted(t2) if t2 > t
    ));
}

#[tokio::test]
async fn after_redis_loses_its_data_only_holders_reclaim_and_tokens_keep_growing() {
    // Arrange: a holds, b waits.
    let ns = Ns::new();
    let redis = RedisLink::new(gantry_tests::REDIS_URL).unwrap();
    let keys = MutexKeys::new(&ns.0, "db");
    locks::set_epoch(&redis, &ns.0, 3, Duration::ZERO)
        .await
        .unwrap();
    let Acquire::Granted(old) = locks::acquire(&redis, &keys, "a", LEASE).await.unwrap() else {
        panic!()
    };
    locks::acquire(&redis, &keys, "b", LEASE).await.unwrap();

    // Act: Redis forgets everything of this namespace (as a restart without persistence does).
    {
        let client = redis::Client::open(gantry_tests::REDIS_URL).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let all: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}.*", ns.0))
            .query_async(&mut c)
            .await
            .unwrap();
        let _: () = redis::cmd("DEL")
            .arg(all)
            .query_async(&mut c)
            .await
            .unwrap();
    }

    // Assert
    assert_eq!(
        locks::renew(&redis, &keys, "a", old, LEASE).await.unwrap(),
        Renew::NoEpoch
    );
    assert_eq!(
        locks::acquire(&redis, &keys, "b", LEASE).await.unwrap(),
        Acquire::NoEpoch
    );
    assert_eq!(
        locks::reclaim(&redis, &keys, "a", LEASE).await.unwrap(),
        Reclaim::NoEpoch
    );
    let quiet = Duration::from_millis(800);
    assert!(locks::set_epoch(&redis, &ns.0, 4, quiet).await.unwrap());
    assert!(
        !locks::set_epoch(&redis, &ns.0, 5, quiet).await.unwrap(),
        "one epoch wins"
    );
    assert_eq!(
        locks::acquire(&redis, &keys, "b", LEASE).await.unwrap(),
        Acquire::Quiet,
        "newcomers wait out the quiet period"
    );
    let Reclaim::Held(new) = locks::reclaim(&redis, &keys, "a", LEASE).await.unwrap() else {
        panic!("the holder re-claims during the quiet period");
    };
    assert!(new > old, "{new} > {old}");
    assert_eq!(
        locks::renew(&redis, &keys, "a", new, LEASE).await.unwrap(),
        Renew::Held
    );
    assert!(locks::release(&redis, &keys, "a", Some(new)).await.unwrap());
    tokio::time::sleep(quiet + Duration::from_millis(100)).await;
    assert_eq!(
        locks::reclaim(&redis, &keys, "c", LEASE).await.unwrap(),
        Reclaim::Lost,
        "too late to re-claim"
    );
    assert!(matches!(
        locks::acquire(&redis, &keys, "b", LEASE).await.unwrap(),
        Acquire::Granted(t) if t > new
    ));
}
