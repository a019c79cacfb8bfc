//! The daemon loop's timing rules.

#[test]
fn repeated_failed_passes_back_off_doubling_up_to_a_cap() {
    use sessiond::daemon::next_delay;
    let s = std::time::Duration::from_secs;
    assert_eq!(next_delay(s(15), 0), s(15));
    assert_eq!(next_delay(s(15), 1), s(30));
    assert_eq!(next_delay(s(15), 3), s(30), "capped at two intervals");
    assert_eq!(next_delay(s(5), 1), s(10));
    assert_eq!(next_delay(s(5), 2), s(15), "or 15 s, whichever is longer");
    assert_eq!(next_delay(s(5), 30), s(15), "so a recovery is seen within 15 s");
    assert_eq!(next_delay(s(1), 30), s(15));
    assert_eq!(next_delay(s(600), 2), s(1200));
}
