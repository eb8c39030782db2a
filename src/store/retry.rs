//! How requests ride through a storage outage. A transient fault (connection refused or reset,
//! a timeout, 408, 429, 500, 502, 503, 504) is retried with capped exponential backoff and
//! jitter, honouring the service's `Retry-After`, until the outage has lasted the **retry
//! budget**; a permanent one fails at once. The outage's clock is shared by the requests of a
//! run: once storage has been unreachable for the budget, a request that meets it again gives up
//! after one try instead of waiting a budget of its own (a run of many files ends in about the
//! budget, not files × budget), and the progress reports read the same clock ("storage
//! unreachable for 40s, retrying").

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The retry budget when none is given: storage blips (a failover, throttling, a node's
/// network restarting) last seconds to a few minutes; azcopy retries a request for minutes too.
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(5 * 60);

/// `--retry-budget` (env `DATASTORE_RETRY_BUDGET`): for the CLI's transfers and runs, the
/// agent, and the operator, which hands its own to every agent it renders.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct RetryBudget {
    /// How long storage may keep failing a request with transient faults (unreachable, reset,
    /// timed out, 408, 429, 500, 502, 503, 504) before the transfer gives up: `90s`, `5m`,
    /// `1h`; `0s` gives up at the first. Permanent errors (400, 403, 404, 409, 412) never wait.
    #[arg(
        long = "retry-budget",
        env = "DATASTORE_RETRY_BUDGET",
        default_value = "5m",
        value_parser = budget
    )]
    pub retry_budget: Duration,
}

fn budget(value: &str) -> Result<Duration, String> {
    match value {
        "0" | "0s" => Ok(Duration::ZERO),
        _ => crate::duration::parse(value),
    }
}

/// The first wait; each next one doubles, up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_millis(250);
/// The longest wait between tries: an outage's end is noticed within this.
const MAX_DELAY: Duration = Duration::from_secs(10);

/// The wait before try `attempt + 1`: `250 ms × 2^(attempt-1)`, capped at [`MAX_DELAY`], of
/// which a random half (so that many requests that failed together do not return together).
pub fn backoff(attempt: u32) -> Duration {
    let base = FIRST_DELAY.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)));
    base.min(MAX_DELAY)
        .mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

/// The retry budget of a run's requests, and the outage clock they share: since when storage
/// has failed every request with transient faults, and the last fault (set by a failure,
/// cleared by any answer). Cheap to clone; clones share the clock.
#[derive(Clone, Debug)]
pub struct Outage {
    budget: Duration,
    down: Arc<Mutex<Option<Down>>>,
}

impl Default for Outage {
    fn default() -> Self {
        Outage::new(DEFAULT_BUDGET)
    }
}

#[derive(Clone, Debug)]
struct Down {
    since: Instant,
    cause: String,
}

/// An outage as a report shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unanswered {
    /// How long storage has failed every request.
    pub for_: Duration,
    /// The last transient fault, e.g. `Connection refused (os error 111)` or `503 ServerBusy`.
    pub cause: String,
}

impl Outage {
    pub fn new(budget: Duration) -> Outage {
        Outage {
            budget,
            down: Arc::default(),
        }
    }

    /// How long a request may keep failing with transient faults.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// A request failed with a transient fault.
    pub fn failed(&self, cause: &str) {
        let mut down = self.down.lock().expect("not poisoned");
        match &mut *down {
            Some(d) => cause.clone_into(&mut d.cause),
            None => {
                *down = Some(Down {
                    since: Instant::now(),
                    cause: cause.to_string(),
                })
            }
        }
    }

    /// Storage answered (a success, or a permanent error: either way it is there).
    pub fn answered(&self) {
        let mut down = self.down.lock().expect("not poisoned");
        if down.is_some() {
            *down = None;
        }
    }

    /// When the outage began, if storage is failing now.
    fn since(&self) -> Option<Instant> {
        self.down
            .lock()
            .expect("not poisoned")
            .as_ref()
            .map(|d| d.since)
    }

    /// The outage now, if any.
    pub fn current(&self) -> Option<Unanswered> {
        self.down
            .lock()
            .expect("not poisoned")
            .as_ref()
            .map(|d| Unanswered {
                for_: d.since.elapsed(),
                cause: d.cause.clone(),
            })
    }
}

/// The retries of one request.
pub struct Retries<'a> {
    outage: &'a Outage,
    /// This request's first failure.
    first: Option<Instant>,
    attempt: u32,
}

impl<'a> Retries<'a> {
    pub fn new(outage: &'a Outage) -> Self {
        Retries {
            outage,
            first: None,
            attempt: 0,
        }
    }

    /// Tries so far, the one just answered included.
    pub fn attempts(&self) -> u32 {
        self.attempt + 1
    }

    /// After a transient fault: how long to wait before trying again, or `None` once the
    /// budget is spent, counted from the earlier of this request's first failure and the
    /// outage's start. The last wait is cut to end with the budget (one more try then), except
    /// a `Retry-After` past it: the service said it will not answer sooner.
    pub fn after_failure(
        &mut self,
        cause: &str,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        let now = Instant::now();
        self.outage.failed(cause);
        self.attempt += 1;
        let first = *self.first.get_or_insert(now);
        let since = self.outage.since().map_or(first, |s| s.min(first));
        let left = (since + self.outage.budget).checked_duration_since(now)?;
        if left.is_zero() || retry_after.is_some_and(|wait| wait > left) {
            return None;
        }
        Some(
            backoff(self.attempt)
                .max(retry_after.unwrap_or_default())
                .min(left),
        )
    }

    /// How long this request kept failing before it gave up (for its error).
    pub fn failing_for(&self) -> Duration {
        self.first.map(|f| f.elapsed()).unwrap_or_default()
    }
}

/// `Retry-After` as Azure sends it on 429 and 503: whole seconds (an HTTP date is not sent).
pub fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.min(3600)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= FIRST_DELAY && backoff(1) >= FIRST_DELAY / 2);
        assert!(backoff(3) >= Duration::from_millis(500));
        for attempt in [7, 30, u32::MAX] {
            let d = backoff(attempt);
            assert!(d <= MAX_DELAY && d >= MAX_DELAY / 2, "{attempt}: {d:?}");
        }
    }

    #[test]
    fn a_request_retries_until_the_budget_and_no_longer() {
        let outage = Outage::new(Duration::from_millis(600));
        let mut retries = Retries::new(&outage);
        let mut waited = Duration::ZERO;
        let mut tries = 0;
        while let Some(delay) = retries.after_failure("refused", None) {
            std::thread::sleep(delay);
            waited += delay;
            tries += 1;
            assert!(tries < 20, "bounded");
        }
        assert!(tries >= 1, "it retried at least once");
        assert!(waited <= Duration::from_millis(600), "{waited:?}");
        assert!(
            waited >= Duration::from_millis(550),
            "the whole budget: {waited:?}"
        );
        assert_eq!(outage.current().unwrap().cause, "refused");
    }

    #[test]
    fn an_outage_past_the_budget_fails_new_requests_at_once() {
        let outage = Outage::new(Duration::from_millis(300));
        outage.failed("refused");
        std::thread::sleep(Duration::from_millis(350));
        let mut late = Retries::new(&outage);
        assert_eq!(late.after_failure("refused", None), None);
        // An answer ends the outage: the next request has its whole budget again.
        outage.answered();
        assert_eq!(outage.current(), None);
        let mut fresh = Retries::new(&outage);
        assert_eq!(fresh.attempts(), 1);
        assert!(fresh.after_failure("refused", None).is_some());
        assert_eq!(fresh.attempts(), 2, "the retry is the second try");
    }

    #[test]
    fn retry_after_is_honoured_within_the_budget() {
        let outage = Outage::new(Duration::from_secs(60));
        let mut retries = Retries::new(&outage);
        let delay = retries.after_failure("503 ServerBusy", Some(Duration::from_secs(7)));
        assert_eq!(delay, Some(Duration::from_secs(7)));
        // A wait the budget cannot hold gives up now rather than sleep past it.
        let short_budget = Outage::new(Duration::from_secs(5));
        let mut short = Retries::new(&short_budget);
        assert_eq!(
            short.after_failure("429", Some(Duration::from_secs(30))),
            None
        );
    }

    #[test]
    fn the_budget_reads_like_every_duration_flag_and_zero_is_allowed() {
        assert_eq!(budget("0s"), Ok(Duration::ZERO));
        assert_eq!(budget("90s"), Ok(Duration::from_secs(90)));
        assert!(budget("5").unwrap_err().contains("such as 90s"));
    }

    #[test]
    fn retry_after_reads_seconds() {
        let mut h = http::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(http::header::RETRY_AFTER, "12".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(12)));
        h.insert(
            http::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
    }
}
