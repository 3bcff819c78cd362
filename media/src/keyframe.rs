//! Coalesces and throttles keyframe requests towards one publisher stream.
//!
//! Why: when a layer switch or a new subscription needs a keyframe, many subscribers (and, in a
//! cascade, many downstream edges) ask at about the same moment. Each PLI makes the publisher's
//! encoder spend a large keyframe, so all of them must cost one request upstream. The same logic
//! runs at every hop of the fan-out tree, so requests coalesce on their way up.
//!
//! How to drive it: call [`KeyframeRequester::handle_request`] whenever anyone needs a keyframe of
//! this stream, [`KeyframeRequester::handle_keyframe`] whenever a keyframe of it arrives, and
//! [`KeyframeRequester::poll_send`] when [`KeyframeRequester::poll_timeout`] is due (or on a tick);
//! send the returned PLI (RFC 4585 §6.3.1) or FIR (RFC 5104 §4.3.1) to the publisher.
//!
//! Rules:
//! - Requests are held while one sent earlier is still being answered: the keyframe on its way
//!   serves the newcomers too.
//! - Two sends are at least `min_interval` apart.
//! - If a keyframe does not arrive within `retry_after` of a send, the request is repeated (the
//!   PLI or the keyframe may have been lost), up to `max_retries` times; a FIR repetition keeps
//!   its sequence number, a new request increments it (RFC 5104 §4.3.1.1).
//! - A keyframe arriving satisfies everything pending.
//!
//! Time model: sans-IO; `now` is passed in, never read.

use std::time::{Duration, Instant};

/// Tuning of a [`KeyframeRequester`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyframeRequesterConfig {
    /// Minimum time between two requests sent upstream. Default 300 ms: a keyframe needs about
    /// one RTT plus an encode to come back; asking faster only makes the encoder waste bits.
    pub min_interval: Duration,
    /// A request not answered by a keyframe within this time is sent again. Default 1 s.
    pub retry_after: Duration,
    /// Repetitions of one unanswered request before giving up until the next
    /// [`KeyframeRequester::handle_request`]. Default 5: a publisher that does not answer in
    /// five seconds is not sending video, and its subscribers keep asking anyway.
    pub max_retries: u32,
    /// Send FIR instead of PLI (the publisher negotiated `ccm fir` and prefers it).
    /// Default `false`: PLI is what browsers answer best.
    pub prefer_fir: bool,
}

impl Default for KeyframeRequesterConfig {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_millis(300),
            retry_after: Duration::from_secs(1),
            max_retries: 5,
            prefer_fir: false,
        }
    }
}

/// Which RTCP feedback to send to the publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyframeRequestKind {
    /// Picture Loss Indication (RFC 4585 §6.3.1).
    Pli,
    /// Full Intra Request (RFC 5104 §4.3.1) with its command sequence number.
    Fir {
        /// Incremented for each new request, kept for repetitions.
        seq_nr: u8,
    },
}

/// Where the request cycle stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing needed.
    Idle,
    /// Someone asked at `since`, nothing sent yet for it.
    Pending { since: Instant },
    /// Sent at `sent`, keyframe not seen yet; `retries` repetitions so far.
    Awaiting { sent: Instant, retries: u32 },
}

/// Keyframe request coalescer and throttle for one publisher stream.
#[derive(Debug, Clone)]
pub struct KeyframeRequester {
    config: KeyframeRequesterConfig,
    state: State,
    last_sent: Option<Instant>,
    /// Sequence number of the latest FIR sent.
    fir_seq_nr: u8,
}

impl KeyframeRequester {
    /// A requester with the given tuning.
    pub fn new(config: KeyframeRequesterConfig) -> Self {
        Self {
            config,
            state: State::Idle,
            last_sent: None,
            fir_seq_nr: 0,
        }
    }

    /// Someone downstream needs a keyframe of this stream.
    pub fn handle_request(&mut self, now: Instant) {
        if self.state == State::Idle {
            self.state = State::Pending { since: now };
        }
        // Pending: already counted. Awaiting: the keyframe on its way serves this request too.
    }

    /// A keyframe of this stream arrived: everything pending is satisfied.
    pub fn handle_keyframe(&mut self, _now: Instant) {
        self.state = State::Idle;
    }

    /// The request to send to the publisher now, if any.
    pub fn poll_send(&mut self, now: Instant) -> Option<KeyframeRequestKind> {
        let throttled = self
            .last_sent
            .is_some_and(|last| now.saturating_duration_since(last) < self.config.min_interval);
        match self.state {
            State::Idle => None,
            State::Pending { .. } => {
                if throttled {
                    return None;
                }
                self.fir_seq_nr = self.fir_seq_nr.wrapping_add(1);
                self.state = State::Awaiting {
                    sent: now,
                    retries: 0,
                };
                self.last_sent = Some(now);
                Some(self.kind())
            }
            State::Awaiting { sent, retries } => {
                if throttled || now.saturating_duration_since(sent) < self.config.retry_after {
                    return None;
                }
                if retries >= self.config.max_retries {
                    self.state = State::Idle;
                    return None;
                }
                self.state = State::Awaiting {
                    sent: now,
                    retries: retries + 1,
                };
                self.last_sent = Some(now);
                Some(self.kind())
            }
        }
    }

    /// When [`Self::poll_send`] next may have something to send.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let throttle_end = self.last_sent.map(|t| t + self.config.min_interval);
        match self.state {
            State::Idle => None,
            State::Pending { since } => Some(throttle_end.map_or(since, |end| end.max(since))),
            State::Awaiting { sent, .. } => Some(sent + self.config.retry_after),
        }
    }

    /// `true` while a request is pending or awaiting its keyframe.
    pub fn is_requesting(&self) -> bool {
        self.state != State::Idle
    }

    fn kind(&self) -> KeyframeRequestKind {
        if self.config.prefer_fir {
            KeyframeRequestKind::Fir {
                seq_nr: self.fir_seq_nr,
            }
        } else {
            KeyframeRequestKind::Pli
        }
    }
}

impl Default for KeyframeRequester {
    fn default() -> Self {
        Self::new(KeyframeRequesterConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// Polls every millisecond over `[from, to)` and returns the offsets (ms from `t0`) of sends.
    fn sends(k: &mut KeyframeRequester, t0: Instant, from: u64, to: u64) -> Vec<u64> {
        (from..to)
            .filter(|&t| k.poll_send(t0 + ms(t)).is_some())
            .collect()
    }

    #[test]
    fn idle_sends_nothing() {
        let t0 = Instant::now();
        let mut k = KeyframeRequester::default();
        assert_eq!(sends(&mut k, t0, 0, 5000), Vec::<u64>::new());
        assert_eq!(k.poll_timeout(), None);
    }

    #[test]
    fn many_requests_at_once_cost_one_pli() {
        let t0 = Instant::now();
        let mut k = KeyframeRequester::default();
        for i in 0..50 {
            k.handle_request(t0 + ms(i));
        }
        assert_eq!(k.poll_timeout(), Some(t0));
        assert_eq!(k.poll_send(t0 + ms(50)), Some(KeyframeRequestKind::Pli));
        // More requests while the keyframe is on its way are absorbed.
        for i in 51..200 {
            k.handle_request(t0 + ms(i));
        }
        assert_eq!(sends(&mut k, t0, 51, 200), Vec::<u64>::new());
        k.handle_keyframe(t0 + ms(200));
        assert!(!k.is_requesting());
        assert_eq!(sends(&mut k, t0, 200, 3000), Vec::<u64>::new());
    }

    #[test]
    fn new_request_after_keyframe_waits_for_min_interval() {
        let t0 = Instant::now();
        let mut k = KeyframeRequester::default();
        k.handle_request(t0);
        assert!(k.poll_send(t0).is_some());
        k.handle_keyframe(t0 + ms(100));
        k.handle_request(t0 + ms(150));
        assert_eq!(k.poll_timeout(), Some(t0 + ms(300)));
        assert_eq!(sends(&mut k, t0, 150, 1000), vec![300]);
    }

    #[test]
    fn unanswered_request_is_repeated_then_abandoned() {
        let t0 = Instant::now();
        let mut k = KeyframeRequester::default();
        k.handle_request(t0);
        let got = sends(&mut k, t0, 0, 20_000);
        // First send plus max_retries repetitions, one per retry_after.
        assert_eq!(got, vec![0, 1000, 2000, 3000, 4000, 5000]);
        assert!(!k.is_requesting());
    }

    #[test]
    fn keyframe_stops_repetition() {
        let t0 = Instant::now();
        let mut k = KeyframeRequester::default();
        k.handle_request(t0);
        assert_eq!(sends(&mut k, t0, 0, 1500), vec![0, 1000]);
        k.handle_keyframe(t0 + ms(1500));
        assert_eq!(sends(&mut k, t0, 1500, 10_000), Vec::<u64>::new());
    }

    #[test]
    fn fir_seq_nr_increments_per_request_not_per_repetition() {
        let t0 = Instant::now();
        let mut k = KeyframeRequester::new(KeyframeRequesterConfig {
            prefer_fir: true,
            ..Default::default()
        });
        k.handle_request(t0);
        assert_eq!(
            k.poll_send(t0),
            Some(KeyframeRequestKind::Fir { seq_nr: 1 })
        );
        // Repetition of the same request keeps the number.
        assert_eq!(
            k.poll_send(t0 + ms(1000)),
            Some(KeyframeRequestKind::Fir { seq_nr: 1 })
        );
        k.handle_keyframe(t0 + ms(1100));
        k.handle_request(t0 + ms(2000));
        assert_eq!(
            k.poll_send(t0 + ms(2000)),
            Some(KeyframeRequestKind::Fir { seq_nr: 2 })
        );
    }

    #[test]
    fn fir_seq_nr_wraps() {
        let t0 = Instant::now();
        let mut k = KeyframeRequester::new(KeyframeRequesterConfig {
            prefer_fir: true,
            ..Default::default()
        });
        let mut last = None;
        for i in 0..300u64 {
            let now = t0 + ms(i * 1000);
            k.handle_request(now);
            last = k.poll_send(now);
            k.handle_keyframe(now);
        }
        // 300 requests: 300 mod 256 = 44.
        assert_eq!(last, Some(KeyframeRequestKind::Fir { seq_nr: 44 }));
    }
}
