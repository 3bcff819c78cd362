//! Dominant speaker detection from the audio level header extension (RFC 6464), without decoding
//! audio.
//!
//! Why: a large meeting forwards video only for its active speakers (last-N), and the client
//! highlights who talks. Every audio packet carries its sender's level in -dBov (0 loudest, 127
//! silence) and, with `vad=on`, a voice activity flag (RFC 6464 §3), which is all we need.
//!
//! How: each source's levels are turned into a loudness above a silence floor and averaged over
//! a sliding `window` (a few hundred milliseconds: longer than a syllable gap, shorter than a turn
//! in a conversation). Time without packets counts as silence, so discontinuous transmission
//! (DTX) fades a source out. A challenger replaces the dominant speaker only after beating it by
//! `switch_margin` for `switch_hold` without interruption, so a cough, a door or a laugh does not
//! switch the stage. When nobody has been active for `silence_timeout`, the dominant speaker is
//! cleared.
//!
//! How to drive it: [`ActiveSpeakerDetector::handle_level`] per received audio packet,
//! [`ActiveSpeakerDetector::poll_change`] at least every ~100 ms (the hold is checked at poll
//! times), [`ActiveSpeakerDetector::remove`] when a track goes away.
//!
//! Time model: sans-IO; `now` is passed in, never read.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Tuning of an [`ActiveSpeakerDetector`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpeakerConfig {
    /// Averaging window. Default 400 ms: bridges the gaps between syllables, short enough to
    /// follow a conversation.
    pub window: Duration,
    /// Levels at or below -`silence_level_dbov` dBov count as silence. Default 60 (-60 dBov is
    /// room noise through a typical microphone with noise suppression; speech is -20..-40).
    pub silence_level_dbov: u8,
    /// Mean loudness (dB above the silence floor, averaged over the window) a source needs to
    /// count as speaking. Default 10.
    pub active_threshold: f32,
    /// How much louder (mean dB above the floor) a challenger must be than the dominant speaker.
    /// Default 6 dB, twice as loud: two people at a similar level do not flap.
    pub switch_margin: f32,
    /// How long a challenger must stay ahead by the margin (or, with nobody dominant, stay
    /// active) before it becomes dominant. Default 500 ms: longer than a cough or a click.
    pub switch_hold: Duration,
    /// Everyone silent this long clears the dominant speaker. Default 2 s: a speaker's pause to
    /// breathe or think keeps the stage.
    pub silence_timeout: Duration,
    /// Nominal packet interval of the audio streams; the window's average divides by at least
    /// `window / packet_interval` samples so that missing packets (DTX) count as silence.
    /// Default 20 ms (Opus' usual frame size).
    pub packet_interval: Duration,
    /// Treat packets with the voice activity flag clear as silence. Default `true`; turn off for
    /// senders that negotiated the extension without `vad=on` and leave the flag at 0.
    pub respect_voice_flag: bool,
}

impl Default for SpeakerConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_millis(400),
            silence_level_dbov: 60,
            active_threshold: 10.0,
            switch_margin: 6.0,
            switch_hold: Duration::from_millis(500),
            silence_timeout: Duration::from_secs(2),
            packet_interval: Duration::from_millis(20),
            respect_voice_flag: true,
        }
    }
}

/// Samples kept per source at most, whatever its packet rate: bounds memory against a sender
/// that sends tiny packets very fast (64 is 2.5 ms packets over the default window).
const MAX_SAMPLES: usize = 64;

#[derive(Debug, Default, Clone)]
struct Source {
    /// (arrival, loudness in dB above the silence floor), oldest first.
    samples: VecDeque<(Instant, u8)>,
}

/// Picks the dominant speaker among audio sources.
#[derive(Debug, Clone)]
pub struct ActiveSpeakerDetector {
    config: SpeakerConfig,
    sources: HashMap<u64, Source>,
    dominant: Option<u64>,
    /// Challenger and since when it has been ahead.
    challenger: Option<(u64, Instant)>,
    /// Since when nobody has been active, while someone is dominant.
    silent_since: Option<Instant>,
    /// The dominant source was removed: report the next state without hold.
    dominant_removed: bool,
}

impl ActiveSpeakerDetector {
    /// A detector with the given tuning.
    pub fn new(config: SpeakerConfig) -> Self {
        Self {
            config,
            sources: HashMap::new(),
            dominant: None,
            challenger: None,
            silent_since: None,
            dominant_removed: false,
        }
    }

    /// An audio packet of `source` arrived with audio level `level_dbov` (-dBov, 0..=127, larger
    /// values clamp to 127) and voice activity flag `voice`.
    pub fn handle_level(&mut self, source: u64, level_dbov: u8, voice: bool, now: Instant) {
        let floor = self.config.silence_level_dbov;
        let loudness = if self.config.respect_voice_flag && !voice {
            0
        } else {
            floor.saturating_sub(level_dbov.min(127))
        };
        let src = self.sources.entry(source).or_default();
        if src.samples.len() >= MAX_SAMPLES {
            src.samples.pop_front();
        }
        src.samples.push_back((now, loudness));
    }

    /// The audio track `source` is gone.
    pub fn remove(&mut self, source: u64) {
        self.sources.remove(&source);
        if self.dominant == Some(source) {
            self.dominant = None;
            self.dominant_removed = true;
        }
        if self.challenger.is_some_and(|(id, _)| id == source) {
            self.challenger = None;
        }
    }

    /// The current dominant speaker.
    pub fn dominant(&self) -> Option<u64> {
        self.dominant
    }

    /// A change of dominant speaker: `Some(Some(id))` for a new dominant speaker, `Some(None)`
    /// when everyone has gone silent (or the dominant one was removed and nobody speaks);
    /// `None` when nothing changed.
    pub fn poll_change(&mut self, now: Instant) -> Option<Option<u64>> {
        self.trim(now);
        let best = self.loudest(now, 1).first().copied();
        let best = best.filter(|&id| self.score(id, now) >= self.config.active_threshold);

        let Some(best) = best else {
            self.challenger = None;
            if std::mem::take(&mut self.dominant_removed) {
                return Some(None);
            }
            self.dominant?;
            let since = *self.silent_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= self.config.silence_timeout {
                self.dominant = None;
                self.silent_since = None;
                return Some(None);
            }
            return None;
        };
        self.silent_since = None;

        if std::mem::take(&mut self.dominant_removed) {
            return self.switch_to(best);
        }
        if self.dominant == Some(best) {
            self.challenger = None;
            return None;
        }
        let ahead = match self.dominant {
            None => true,
            Some(current) => {
                self.score(best, now) >= self.score(current, now) + self.config.switch_margin
            }
        };
        if !ahead {
            self.challenger = None;
            return None;
        }
        let since = match self.challenger {
            Some((id, since)) if id == best => since,
            _ => {
                self.challenger = Some((best, now));
                now
            }
        };
        if now.saturating_duration_since(since) >= self.config.switch_hold {
            return self.switch_to(best);
        }
        None
    }

    /// Up to `n` sources speaking at `now`, loudest first (for last-N selection). Ties are broken
    /// by the lower id, so the order is deterministic.
    pub fn loudest(&self, now: Instant, n: usize) -> Vec<u64> {
        let mut scored: Vec<(u64, f32)> = self
            .sources
            .keys()
            .map(|&id| (id, self.score(id, now)))
            .filter(|&(_, s)| s > 0.0)
            .collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        scored.into_iter().take(n).map(|(id, _)| id).collect()
    }

    fn switch_to(&mut self, id: u64) -> Option<Option<u64>> {
        self.dominant = Some(id);
        self.challenger = None;
        Some(Some(id))
    }

    /// Mean loudness of `id` over the window ending at `now`, with missing packets as silence.
    fn score(&self, id: u64, now: Instant) -> f32 {
        let Some(src) = self.sources.get(&id) else {
            return 0.0;
        };
        let window = self.config.window;
        let (sum, count) = src
            .samples
            .iter()
            .filter(|(t, _)| now.saturating_duration_since(*t) < window)
            .fold((0u32, 0u32), |(s, c), (_, l)| (s + u32::from(*l), c + 1));
        let interval = self.config.packet_interval.max(Duration::from_millis(1));
        let expected = (window.as_secs_f32() / interval.as_secs_f32()).max(1.0);
        sum as f32 / (count as f32).max(expected)
    }

    /// Drops samples that left the window.
    fn trim(&mut self, now: Instant) {
        let window = self.config.window;
        for src in self.sources.values_mut() {
            while src
                .samples
                .front()
                .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= window)
            {
                src.samples.pop_front();
            }
        }
    }
}

impl Default for ActiveSpeakerDetector {
    fn default() -> Self {
        Self::new(SpeakerConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = 1;
    const B: u64 = 2;
    const C: u64 = 3;
    /// Level of someone speaking normally.
    const SPEECH: u8 = 30;
    const LOUD: u8 = 15;
    const QUIET_SPEECH: u8 = 40;

    /// Drives a detector in 20 ms steps over `[from_ms, to_ms)`: each step feeds every source of
    /// `levels(t_ms)` (None = no packet) and polls; returns the changes with their time.
    fn run(
        d: &mut ActiveSpeakerDetector,
        t0: Instant,
        from_ms: u64,
        to_ms: u64,
        levels: impl Fn(u64) -> Vec<(u64, Option<(u8, bool)>)>,
    ) -> Vec<(u64, Option<u64>)> {
        let mut changes = Vec::new();
        let mut t = from_ms;
        while t < to_ms {
            let now = t0 + Duration::from_millis(t);
            for (src, level) in levels(t) {
                if let Some((lvl, voice)) = level {
                    d.handle_level(src, lvl, voice, now);
                }
            }
            if let Some(change) = d.poll_change(now) {
                changes.push((t, change));
            }
            t += 20;
        }
        changes
    }

    #[test]
    fn single_speaker_becomes_dominant_after_hold() {
        let t0 = Instant::now();
        let mut d = ActiveSpeakerDetector::default();
        let changes = run(&mut d, t0, 0, 3000, |_| vec![(A, Some((SPEECH, true)))]);
        assert_eq!(changes.len(), 1, "{changes:?}");
        let (at, who) = changes[0];
        assert_eq!(who, Some(A));
        assert!((500..=800).contains(&at), "switched at {at} ms");
        assert_eq!(d.dominant(), Some(A));
    }

    #[test]
    fn short_noise_does_not_switch() {
        let t0 = Instant::now();
        let mut d = ActiveSpeakerDetector::default();
        run(&mut d, t0, 0, 2000, |_| vec![(A, Some((SPEECH, true)))]);
        assert_eq!(d.dominant(), Some(A));
        // B coughs loudly for 200 ms while A keeps talking.
        let changes = run(&mut d, t0, 2000, 5000, |t| {
            let b = (2000..2200).contains(&t).then_some((0, true));
            vec![(A, Some((SPEECH, true))), (B, b)]
        });
        assert_eq!(changes, vec![]);
    }

    #[test]
    fn clearly_louder_speaker_takes_over() {
        let t0 = Instant::now();
        let mut d = ActiveSpeakerDetector::default();
        run(&mut d, t0, 0, 2000, |_| {
            vec![(A, Some((QUIET_SPEECH, true)))]
        });
        let changes = run(&mut d, t0, 2000, 5000, |_| {
            vec![(A, Some((QUIET_SPEECH, true))), (B, Some((LOUD, true)))]
        });
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].1, Some(B));
        assert!(changes[0].0 >= 2500, "needs the hold: {changes:?}");
    }

    #[test]
    fn similar_levels_do_not_flap() {
        let t0 = Instant::now();
        let mut d = ActiveSpeakerDetector::default();
        run(&mut d, t0, 0, 2000, |_| vec![(A, Some((SPEECH, true)))]);
        let changes = run(&mut d, t0, 2000, 10_000, |t| {
            // B is slightly louder, with some alternation.
            let b = if (t / 100) % 2 == 0 {
                SPEECH - 3
            } else {
                SPEECH - 1
            };
            vec![(A, Some((SPEECH, true))), (B, Some((b, true)))]
        });
        assert_eq!(changes, vec![]);
    }

    #[test]
    fn turn_taking_switches_when_first_speaker_stops() {
        let t0 = Instant::now();
        let mut d = ActiveSpeakerDetector::default();
        run(&mut d, t0, 0, 2000, |_| vec![(A, Some((SPEECH, true)))]);
        // A falls silent (DTX: no packets), B starts at the same level.
        let changes = run(&mut d, t0, 2000, 4000, |_| vec![(B, Some((SPEECH, true)))]);
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].1, Some(B));
    }

    #[test]
    fn everyone_silent_clears_after_timeout() {
        let t0 = Instant::now();
        let mut d = ActiveSpeakerDetector::default();
        run(&mut d, t0, 0, 2000, |_| vec![(A, Some((SPEECH, true)))]);
        // Packets keep coming but carry silence.
        let changes = run(&mut d, t0, 2000, 6000, |_| {
            vec![(A, Some((127, false))), (B, Some((100, false)))]
        });
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].1, None);
        let at = changes[0].0;
        assert!((4000..=4600).contains(&at), "cleared at {at} ms");
    }

    #[test]
    fn short_pause_keeps_the_speaker() {
        let t0 = Instant::now();
        let mut d = ActiveSpeakerDetector::default();
        run(&mut d, t0, 0, 2000, |_| vec![(A, Some((SPEECH, true)))]);
        let changes = run(&mut d, t0, 2000, 6000, |t| {
            let a = if (2000..3000).contains(&t) {
                127
            } else {
                SPEECH
            };
            vec![(A, Some((a, true)))]
        });
        assert_eq!(changes, vec![]);
    }

    #[test]
    fn voice_flag_clear_counts_as_silence_unless_configured() {
        let t0 = Instant::now();
        let mut d = ActiveSpeakerDetector::default();
        let changes = run(&mut d, t0, 0, 3000, |_| vec![(A, Some((SPEECH, false)))]);
        assert_eq!(changes, vec![]);

        let mut d = ActiveSpeakerDetector::new(SpeakerConfig {
            respect_voice_flag: false,
            ..Default::default()
        });
        let changes = run(&mut d, t0, 0, 3000, |_| vec![(A, Some((SPEECH, false)))]);
        assert_eq!(changes.len(), 1);
    }

    #[test]
    fn removing_the_dominant_speaker_reports_at_once() {
        let t0 = Instant::now();
        let mut d = ActiveSpeakerDetector::default();
        run(&mut d, t0, 0, 2000, |_| {
            vec![(A, Some((LOUD, true))), (B, Some((QUIET_SPEECH, true)))]
        });
        assert_eq!(d.dominant(), Some(A));
        d.remove(A);
        let now = t0 + Duration::from_millis(2000);
        d.handle_level(B, QUIET_SPEECH, true, now);
        assert_eq!(d.poll_change(now), Some(Some(B)));

        d.remove(B);
        assert_eq!(d.poll_change(now), Some(None));
        assert_eq!(d.poll_change(now), None);
    }

    #[test]
    fn loudest_ranks_sources() {
        let t0 = Instant::now();
        let mut d = ActiveSpeakerDetector::default();
        run(&mut d, t0, 0, 1000, |_| {
            vec![
                (A, Some((QUIET_SPEECH, true))),
                (B, Some((LOUD, true))),
                (C, Some((127, true))),
            ]
        });
        let now = t0 + Duration::from_millis(1000);
        assert_eq!(d.loudest(now, 3), vec![B, A]);
        assert_eq!(d.loudest(now, 1), vec![B]);
    }

    #[test]
    fn samples_are_bounded() {
        let t0 = Instant::now();
        let mut d = ActiveSpeakerDetector::default();
        for _ in 0..10_000 {
            d.handle_level(A, 0, true, t0);
        }
        assert!(d.sources[&A].samples.len() <= MAX_SAMPLES);
    }
}
