//! The one-call-per-second rule under a manual clock: lifetimes of zero or one
//! second never turn a busy client into a storm of token-endpoint calls, and a
//! fresh token always reaches the requests that waited for it.

use tokio::task::JoinSet;

use super::*;

/// A rotation answer with the given lifetime.
fn short(n: u64, lifetime: Duration) -> Result<Refreshed, RefreshError> {
    Ok(Refreshed {
        access_token: Secret::new(format!("at-s{n}")),
        token_type: "Bearer".into(),
        expires_in: Some(lifetime),
        refresh_token: Some(Secret::new(format!("rt-s{n}"))),
        scopes: None,
        client_auth_detected: None,
    })
}

/// A client calling `GetToken` in a loop for `secs` seconds of fake time (five
/// requests every 50 ms) against an IdP that issues `lifetime` tokens. Returns
/// the IdP calls made; asserts every request got a token.
async fn get_token_loop(lifetime: Duration, secs: u64) -> usize {
    let rig = fresh_rig();
    for n in 0..10_000 {
        rig.idp.push(short(n, lifetime));
    }
    // Expired, and mid-second, so the floored `issued_at` bites.
    rig.clock.advance(Duration::from_millis(100_900));
    let mut requests = JoinSet::new();
    for _ in 0..secs * 20 {
        for _ in 0..5 {
            let engine = rig.engine.clone();
            requests.spawn(async move { engine.get_token(0).await });
        }
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
        rig.clock.advance(Duration::from_millis(50));
    }
    // Let the last waiters finish: time moves until every request is answered.
    timeout(SAFETY, async {
        loop {
            while let Some(done) = requests.try_join_next() {
                let token = done.unwrap().expect("a healthy IdP means no error");
                assert!(token.generation >= 2);
            }
            if requests.is_empty() {
                return;
            }
            rig.clock.advance(Duration::from_millis(50));
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("every request is answered");
    let times = rig.idp.call_times();
    for pair in times.windows(2) {
        assert!(pair[1] - pair[0] >= 1000, "calls {pair:?} closer than 1 s");
    }
    times.len()
}

#[tokio::test]
async fn zero_lifetimes_and_a_get_token_loop_make_at_most_one_call_per_second() {
    let calls = get_token_loop(Duration::ZERO, 10).await;
    println!("expires_in 0, GetToken loop for 10 s of fake time: {calls} IdP calls");
    assert!((1..=12).contains(&calls), "{calls} calls in 10 s");
}

#[tokio::test]
async fn one_second_lifetimes_and_a_get_token_loop_make_at_most_one_call_per_second() {
    let calls = get_token_loop(Duration::from_secs(1), 10).await;
    println!("expires_in 1, GetToken loop for 10 s of fake time: {calls} IdP calls");
    assert!((1..=12).contains(&calls), "{calls} calls in 10 s");
}

#[tokio::test]
async fn a_fresh_token_reaches_its_waiters_even_if_shorter_than_asked_or_already_past_its_floored_expiry(
) {
    let rig = fresh_rig();
    rig.clock.advance(Duration::from_millis(100_900));
    rig.idp.push(short(1, Duration::from_secs(1)));
    rig.idp.hold.store(true, Ordering::SeqCst);
    let waiter = tokio::spawn({
        let engine = rig.engine.clone();
        async move { engine.get_token(600).await }
    });
    rig.idp.wait_calls(1).await;
    // The IdP answers 300 ms later: the token (issued at the floored second,
    // one second of life) has expired by our clock when it arrives.
    rig.clock.advance(Duration::from_millis(300));
    rig.idp.hold.store(false, Ordering::SeqCst);
    rig.idp.release.notify_waiters();
    let token = timeout(SAFETY, waiter)
        .await
        .expect("answered")
        .unwrap()
        .expect("the fresh token, not IdpUnavailable");
    assert_eq!(token.access_token.expose(), "at-s1");
    assert_eq!(rig.idp.calls(), 1);
}

#[tokio::test]
async fn forced_refreshes_and_invalidations_are_spaced_too() {
    let rig = fresh_rig();
    rig.engine.refresh().await.unwrap();
    let second = tokio::spawn({
        let engine = rig.engine.clone();
        async move { engine.refresh().await }
    });
    let generation = rig.engine.status().generation;
    let invalidated = tokio::spawn({
        let engine = rig.engine.clone();
        async move { engine.invalidate(generation).await }
    });
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(rig.idp.calls(), 1, "the second call waits for its second");
    rig.clock.advance(Duration::from_secs(1));
    let a = second.await.unwrap().unwrap();
    let b = invalidated.await.unwrap().unwrap();
    assert_eq!(a.generation, b.generation, "both joined one call");
    let times = rig.idp.call_times();
    assert_eq!(times, [T0_MS, T0_MS + 1000]);
}
