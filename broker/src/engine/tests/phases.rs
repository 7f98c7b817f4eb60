//! Transitions of the phases that hold pending work (`Unsaved`, `Dead`) and of
//! a stopped engine, each driven through the handle with a manual clock.

use super::*;

/// Fails the store, forces a refresh, and returns once the rotated record
/// (refresh token `rt-100`) exists only in memory.
async fn unsaved_rig() -> (Rig, u64) {
    let rig = fresh_rig();
    rig.store.fail.store(true, Ordering::SeqCst);
    let err = rig.engine.refresh().await.unwrap_err();
    assert!(matches!(err, BrokerError::Internal { .. }), "{err:?}");
    let snap = rig
        .wait_phase(|p| matches!(p, PhaseKind::Backoff { .. }))
        .await;
    let PhaseKind::Backoff { until_ms } = snap.phase else {
        unreachable!()
    };
    assert!(snap.token.is_none(), "an unsaved token is never published");
    (rig, until_ms)
}

#[tokio::test]
async fn an_unsaved_record_answers_unavailable_and_is_saved_when_its_retry_time_comes() {
    let (rig, until_ms) = unsaved_rig().await;
    // Neither the rotated token nor the old one is served meanwhile.
    let err = rig.engine.get_token(0).await.unwrap_err();
    assert!(matches!(err, BrokerError::IdpUnavailable { .. }), "{err:?}");
    rig.store.fail.store(false, Ordering::SeqCst);
    rig.clock
        .advance(Duration::from_millis(until_ms - rig.clock.now_ms()));
    // No request: the actor's own turn retries the save.
    let snap = rig.wait_phase(|p| p == PhaseKind::Idle).await;
    assert_eq!(snap.token.unwrap().access_token.expose(), "at-100");
    assert_eq!(rig.store.last().refresh_token.unwrap().expose(), "rt-100");
    assert_eq!(
        rig.idp.calls(),
        1,
        "the retry saved; it did not refresh again"
    );
}

#[tokio::test]
async fn a_forced_refresh_of_an_unsaved_record_saves_it_without_calling_the_idp() {
    let (rig, _) = unsaved_rig().await;
    rig.store.fail.store(false, Ordering::SeqCst);
    // Before the retry time: the user's refresh saves at once.
    let token = rig.engine.refresh().await.unwrap();
    assert_eq!(token.access_token.expose(), "at-100");
    assert_eq!(rig.store.last().refresh_token.unwrap().expose(), "rt-100");
    assert_eq!(rig.idp.calls(), 1);
}

#[tokio::test]
async fn a_new_client_on_an_unsaved_record_keeps_the_rotated_refresh_token() {
    let (rig, _) = unsaved_rig().await;
    rig.store.fail.store(false, Ordering::SeqCst);
    // Past the one-call-per-second gap, so the new client's refresh runs at once.
    rig.clock.advance(Duration::from_secs(1));
    let token = rig
        .engine
        .set_client(ClientCredential::Secret(Secret::from("s2")), None)
        .await
        .unwrap();
    assert_eq!(token.access_token.expose(), "at-101");
    assert_eq!(rig.idp.presented(), ["rt-0", "rt-100"]);
    let saved = rig.store.last();
    assert_eq!(saved.client_secret.unwrap().expose(), "s2");
    assert_eq!(saved.refresh_token.unwrap().expose(), "rt-101");
}

#[tokio::test]
async fn stopping_with_an_unsaved_record_tries_one_last_save() {
    let (rig, _) = unsaved_rig().await;
    rig.store.fail.store(false, Ordering::SeqCst);
    let last = rig.engine.stop().await.expect("engine was running");
    assert_eq!(last.refresh_token.unwrap().expose(), "rt-100");
    assert_eq!(rig.store.last().refresh_token.unwrap().expose(), "rt-100");
    assert_eq!(rig.idp.calls(), 1);
}

#[tokio::test]
async fn a_dead_grant_refuses_refresh_and_a_new_client_without_calling_the_idp() {
    let rig = fresh_rig();
    rig.idp
        .push(Err(RefreshError::Rejected("invalid_grant".into())));
    let err = rig.engine.refresh().await.unwrap_err();
    assert!(matches!(err, BrokerError::ReauthRequired { .. }), "{err:?}");
    let err = rig.engine.refresh().await.unwrap_err();
    assert!(matches!(err, BrokerError::ReauthRequired { .. }), "{err:?}");
    let err = rig
        .engine
        .set_client(ClientCredential::None, None)
        .await
        .unwrap_err();
    assert!(matches!(err, BrokerError::ReauthRequired { .. }), "{err:?}");
    let err = rig.engine.invalidate(2).await.unwrap_err();
    assert!(matches!(err, BrokerError::ReauthRequired { .. }), "{err:?}");
    assert_eq!(rig.idp.calls(), 1);
    assert!(rig.store.last().refresh_token.is_none());
}

#[tokio::test]
async fn a_stopped_engine_says_it_stopped_instead_of_unknown_profile() {
    let rig = fresh_rig();
    rig.engine.stop().await.expect("engine was running");
    // Only the actor answers an invalidation (no cached answer).
    let err = rig.engine.invalidate(1).await.unwrap_err();
    assert!(
        matches!(err, BrokerError::Internal { ref detail } if detail.contains("engine of profile `work` stopped")),
        "{err:?}"
    );
    let err = rig.engine.replace(record(T0_MS / 1000)).await.unwrap_err();
    assert!(
        matches!(err, crate::Error::EngineStopped(ref p) if p == "work"),
        "{err:?}"
    );
    assert!(matches!(
        rig.engine.remove().await,
        Err(crate::Error::EngineStopped(_))
    ));
}
