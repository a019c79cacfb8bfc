//! The daemon loop's timing rules.

#[test]
fn repeated_failed_passes_back_off_doubling_up_to_a_cap() {
    use sessiond::daemon::next_delay;
    let s = std::time::Duration::from_secs;
    assert_eq!(next_delay(s(15), 0), s(15));
    assert_eq!(next_delay(s(15), 1), s(30));
    assert_eq!(next_delay(s(15), 3), s(120));
    assert_eq!(next_delay(s(15), 30), s(300), "capped at five minutes");
    assert_eq!(next_delay(s(600), 2), s(600), "never shorter than the interval");
}
