//! Rapid creates: sessions of one owner created within a short window of each
//! other, the signature of the duplicate-sessions race (several concurrent
//! get-or-create calls for one user). Pure: counted from the rows' creation
//! times, which all come from the database.
//!
//! Each pass reads every row created within a lookback (longer than the
//! window and than the time between passes), so a row committed late, or
//! dated ahead, is still seen. A session is counted once: the ids counted are
//! remembered for as long as they can be read again. The first pass of a
//! process (or of a new leader) only learns what is there, so what an earlier
//! process counted is never counted twice.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::model::RecentCreate;

/// At least this much of the recent past is read every pass.
pub const MIN_LOOKBACK: Duration = Duration::from_secs(60);

/// How far back a pass reads for `window`, with passes `interval` apart.
pub fn lookback(window: Duration, interval: Duration) -> Duration {
    window + MIN_LOOKBACK.max(interval.saturating_mul(3))
}

/// What earlier passes counted.
#[derive(Clone, Debug, Default)]
pub struct RapidCreates {
    /// Sessions already counted (or already there at the first pass), with
    /// their creation time, until they fall out of the lookback.
    counted: HashMap<String, DateTime<Utc>>,
    seeded: bool,
}

impl RapidCreates {
    /// Counts the sessions in `rows` created within `window` of an earlier
    /// session of the same owner, that no earlier pass counted. `now` is the
    /// database's clock at the read; `lookback` how far back it read.
    pub fn observe(&mut self, rows: &[RecentCreate], window: Duration, now: DateTime<Utc>, lookback: Duration) -> u64 {
        let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
        let mut by_owner: HashMap<&str, Vec<&RecentCreate>> = HashMap::new();
        for r in rows {
            by_owner.entry(r.owner.as_str()).or_default().push(r);
        }
        let mut n = 0;
        for sessions in by_owner.values_mut() {
            if sessions.len() < 2 {
                continue;
            }
            sessions.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
            for pair in sessions.windows(2) {
                let (earlier, later) = (pair[0], pair[1]);
                if later.created_at - earlier.created_at > window {
                    continue;
                }
                if self.counted.insert(later.id.clone(), later.created_at).is_none() && self.seeded {
                    n += 1;
                }
            }
        }
        self.seeded = true;
        // Forget what the next read can no longer return.
        let horizon = now - chrono::Duration::from_std(lookback).unwrap_or(chrono::Duration::MAX);
        self.counted.retain(|_, at| *at > horizon);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(1_800_000_000_000 + ms).single().unwrap_or_default()
    }

    fn row(id: &str, owner: &str, ms: i64) -> RecentCreate {
        RecentCreate { id: id.into(), owner: owner.into(), created_at: t(ms) }
    }

    const W: Duration = Duration::from_secs(10);
    const L: Duration = Duration::from_secs(70);

    fn seeded() -> RapidCreates {
        let mut r = RapidCreates::default();
        assert_eq!(r.observe(&[], W, t(0), L), 0);
        r
    }

    #[test]
    fn three_creates_in_a_second_are_two_rapid_creates_counted_once() {
        let mut r = seeded();
        let rows = [row("a", "u", 1000), row("b", "u", 1300), row("c", "u", 1900)];
        assert_eq!(r.observe(&rows, W, t(2000), L), 2);
        assert_eq!(r.observe(&rows, W, t(3000), L), 0, "a later pass reads them again and counts nothing");
    }

    #[test]
    fn creates_further_apart_than_the_window_or_of_other_owners_are_not_rapid() {
        let mut r = seeded();
        let rows = [row("a", "u", 0), row("b", "u", 11_000), row("c", "v", 0), row("d", "w", 100)];
        assert_eq!(r.observe(&rows, W, t(12_000), L), 0);
    }

    #[test]
    fn a_row_committed_late_or_dated_ahead_is_counted_once_when_it_appears() {
        let mut r = seeded();
        assert_eq!(r.observe(&[row("a", "u", 1000)], W, t(2000), L), 0);
        // "b" was created at 1500 but committed after the last read.
        assert_eq!(r.observe(&[row("a", "u", 1000), row("b", "u", 1500)], W, t(4000), L), 1);
        // "c" is dated ahead of the database's clock.
        let rows = [row("a", "u", 1000), row("b", "u", 1500), row("c", "u", 9000)];
        assert_eq!(r.observe(&rows, W, t(5000), L), 1);
        assert_eq!(r.observe(&rows, W, t(9500), L), 0);
    }

    #[test]
    fn the_first_pass_counts_nothing_already_there() {
        let mut r = RapidCreates::default();
        let rows = [row("a", "u", 1000), row("b", "u", 1300)];
        assert_eq!(r.observe(&rows, W, t(2000), L), 0, "an earlier process may have counted them");
        assert_eq!(r.observe(&[row("a", "u", 1000), row("b", "u", 1300), row("c", "u", 2500)], W, t(3000), L), 1);
    }

    #[test]
    fn ids_are_forgotten_once_they_fall_out_of_the_lookback() {
        let mut r = seeded();
        assert_eq!(r.observe(&[row("a", "u", 0), row("b", "u", 100)], W, t(1000), L), 1);
        assert_eq!(r.observe(&[], W, t(100_000), L), 0);
        assert!(r.counted.is_empty());
    }
}
