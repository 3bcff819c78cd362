//! Simulcast layer selection per (subscriber, video track).
//!
//! Mechanism after LiveKit's forwarder, with three layers of intent:
//!
//! - **max**: the highest layer the subscriber wants (its tile size); `None` pauses the track.
//! - **target**: the layer we want to forward, chosen from max, the budget the edge's allocator
//!   grants this track for this subscriber, and the measured bitrate of each incoming layer.
//! - **current**: the layer actually forwarded. It changes only at a keyframe of the target
//!   layer (a decoder cannot start a new layer's stream mid-GOP), so until that keyframe the
//!   current layer keeps flowing and [`LayerSelector::poll_keyframe_request`] asks for one.
//!
//! Target policy, evaluated at each allocation:
//!
//! - Candidates are the layers `<= max` that are being received (a `None` bitrate is a layer the
//!   publisher stopped sending; it is never a target).
//! - Staying or going down: the highest candidate whose bitrate fits the budget. Going down
//!   happens at once when the target no longer fits.
//! - Going up: a higher layer must fit with a margin ([`LayerSelectorConfig::upgrade_margin_percent`])
//!   and not sooner than a hold-off after the last budget downgrade. When an upgrade is followed
//!   by a budget downgrade within [`LayerSelectorConfig::oscillation_window`], the link likely
//!   cannot carry the upper layer: the hold-off doubles (2 s up to 16 s), so a capped link does not
//!   oscillate. A downgrade that follows a lasting upgrade resets it.
//! - Nothing fits: the lowest candidate. Our choice: the selector never pauses a track on its own,
//!   however small the budget (video at the lowest layer is better than nothing, and the edge's
//!   bandwidth estimator, which sees the whole subscriber, decides what to give up; it pauses a
//!   track with `set_max_layer(None)`). There is deliberately no bitrate floor in here.
//! - Before the first allocation the target is layer 0: start cheap, then upgrade.
//!
//! Only budget-driven downgrades count for the hold-off; a smaller tile (lower max) or a layer
//! that disappears moves the target down without penalising later upgrades.

use std::time::{Duration, Instant};

use crate::units::{Bitrate, SpatialLayer};

/// Tuning of a [`LayerSelector`]; `Default` holds the values we run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSelectorConfig {
    /// Upgrade only when `budget >= bitrate * upgrade_margin_percent / 100`. Default 115: layer
    /// bitrates vary by more than 10% around their mean (keyframes, motion), so an upgrade that
    /// barely fits is downgraded again at the next burst.
    pub upgrade_margin_percent: u64,
    /// Minimum time between a budget downgrade and the next upgrade. Default 2 s: a couple of
    /// estimator updates, so a short dip does not pin a subscriber low for long.
    pub initial_hold_off: Duration,
    /// Cap of the doubling hold-off. Default 16 s: the edge's bandwidth probes already keep
    /// upgrades off a link that cannot carry them, so this only damps oscillation, and a link
    /// that recovers gets the upper layer back within about 20 s.
    pub max_hold_off: Duration,
    /// A budget downgrade this soon after an upgrade doubles the hold-off. Default 5 s: the time a
    /// delay-based estimator needs to notice that the new layer overloads the link.
    pub oscillation_window: Duration,
    /// While current differs from target, re-request a keyframe this often. Default 1 s: a lost
    /// PLI or FIR is retried quickly; the caller additionally throttles per publisher layer.
    pub keyframe_retry: Duration,
}

impl Default for LayerSelectorConfig {
    fn default() -> Self {
        Self {
            upgrade_margin_percent: 115,
            initial_hold_off: Duration::from_secs(2),
            max_hold_off: Duration::from_secs(16),
            oscillation_window: Duration::from_secs(5),
            keyframe_retry: Duration::from_secs(1),
        }
    }
}

/// What to do with one incoming packet for this subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Do not forward (and tell the [`RtpRewriter`](crate::rewrite::RtpRewriter) nothing: it is
    /// not of the forwarded layer, or forwarding is paused and the next packet is a switch).
    Drop,
    /// Forward; `switch` = this keyframe starts the newly current layer.
    Forward {
        /// Pass to [`RtpRewriter::rewrite`](crate::rewrite::RtpRewriter::rewrite).
        switch: bool,
    },
}

/// The last allocation input.
#[derive(Debug, Clone)]
struct Allocation {
    budget: Bitrate,
    rates: Vec<Option<Bitrate>>,
}

impl Allocation {
    fn rate(&self, layer: u8) -> Option<Bitrate> {
        self.rates.get(usize::from(layer)).copied().flatten()
    }
}

/// Chooses the simulcast layer one subscriber receives of one video track.
#[derive(Debug, Clone)]
pub struct LayerSelector {
    config: LayerSelectorConfig,
    layer_count: u8,
    max: Option<SpatialLayer>,
    allocation: Option<Allocation>,
    target: Option<SpatialLayer>,
    current: Option<SpatialLayer>,
    hold_off: Duration,
    last_upgrade: Option<Instant>,
    last_downgrade: Option<Instant>,
    last_keyframe_request: Option<Instant>,
}

impl LayerSelector {
    /// A selector for a track with `layer_count` simulcast layers (1 for a plain video track; 0
    /// is treated as 1), with the default config.
    pub fn new(layer_count: u8) -> Self {
        Self::with_config(layer_count, LayerSelectorConfig::default())
    }

    /// A selector with an explicit config.
    pub fn with_config(layer_count: u8, config: LayerSelectorConfig) -> Self {
        let layer_count = layer_count.max(1);
        Self {
            config,
            layer_count,
            max: Some(SpatialLayer(layer_count - 1)),
            allocation: None,
            target: Some(SpatialLayer(0)),
            current: None,
            hold_off: config.initial_hold_off,
            last_upgrade: None,
            last_downgrade: None,
            last_keyframe_request: None,
        }
    }

    /// The layer being forwarded.
    pub fn current(&self) -> Option<SpatialLayer> {
        self.current
    }

    /// The layer we are moving to (equal to current when settled); `None` when paused or when no
    /// layer is received.
    pub fn target(&self) -> Option<SpatialLayer> {
        self.target
    }

    /// The subscriber's preference; `None` = paused.
    pub fn max_layer(&self) -> Option<SpatialLayer> {
        self.max
    }

    /// The current upgrade hold-off (grows while the link oscillates).
    pub fn hold_off(&self) -> Duration {
        self.hold_off
    }

    /// Sets the subscriber preference (tile size); `None` pauses forwarding at once.
    ///
    /// Lowering max or pausing takes effect now; a higher max is used from the next
    /// [`handle_allocation`](Self::handle_allocation), which applies the budget rules to the
    /// upgrade. Resuming from pause chooses the best layer that fits the last allocation.
    pub fn set_max_layer(&mut self, max: Option<SpatialLayer>) {
        self.max = max.map(|m| SpatialLayer(m.0.min(self.layer_count - 1)));
        self.update_target(None);
    }

    /// Allocation input: the bandwidth the edge may spend on this track for this subscriber, and
    /// the measured bitrate of each incoming layer (`None` = layer not currently received).
    pub fn handle_allocation(
        &mut self,
        budget: Bitrate,
        layer_bitrates: &[Option<Bitrate>],
        now: Instant,
    ) {
        let a = self.allocation.get_or_insert(Allocation {
            budget,
            rates: Vec::with_capacity(usize::from(self.layer_count)),
        });
        a.budget = budget;
        a.rates.clear();
        a.rates.extend(
            layer_bitrates
                .iter()
                .take(usize::from(self.layer_count))
                .copied(),
        );
        if let Some(c) = self.current {
            if a.rate(c.0).is_none() {
                // The forwarded layer is gone: the next keyframe of any layer up to the target
                // restarts forwarding.
                self.current = None;
            }
        }
        self.update_target(Some(now));
    }

    /// Decides what to do with a packet of `layer`.
    ///
    /// `now` is accepted for symmetry with the other inputs; per-packet decisions do not depend
    /// on time.
    pub fn handle_packet(
        &mut self,
        layer: SpatialLayer,
        is_keyframe: bool,
        now: Instant,
    ) -> Decision {
        let _ = now;
        let Some(target) = self.target else {
            self.current = None;
            return Decision::Drop;
        };
        if is_keyframe && self.current != Some(target) {
            // Switch at the target's keyframe; with nothing flowing, any lower layer's keyframe
            // gets video going sooner (we keep asking for the target's).
            if layer == target || (self.current.is_none() && layer < target) {
                self.current = Some(layer);
                return Decision::Forward { switch: true };
            }
        }
        if self.current == Some(layer) {
            Decision::Forward { switch: false }
        } else {
            Decision::Drop
        }
    }

    /// The layer to request a keyframe on, while the target differs from the current layer:
    /// at once when the target changes, then every [`LayerSelectorConfig::keyframe_retry`]
    /// (the caller throttles per publisher layer).
    pub fn poll_keyframe_request(&mut self, now: Instant) -> Option<SpatialLayer> {
        let target = self.target?;
        if self.current == Some(target) {
            return None;
        }
        if self
            .last_keyframe_request
            .is_some_and(|t| now.saturating_duration_since(t) < self.config.keyframe_retry)
        {
            return None;
        }
        self.last_keyframe_request = Some(now);
        Some(target)
    }

    /// Recomputes the target; `now` is `None` outside allocations, where no upgrade happens.
    fn update_target(&mut self, now: Option<Instant>) {
        let old = self.target;
        let new = self.choose(now);
        if new == old {
            return;
        }
        match (old, new, now) {
            (Some(o), Some(n), Some(now)) if n < o && self.is_candidate(o) => {
                // The old target is still wanted and received: the budget forced this downgrade.
                let oscillating = self.last_upgrade.is_some_and(|u| {
                    now.saturating_duration_since(u) <= self.config.oscillation_window
                });
                self.hold_off = if oscillating {
                    self.hold_off
                        .saturating_mul(2)
                        .min(self.config.max_hold_off)
                } else {
                    self.config.initial_hold_off
                };
                self.last_downgrade = Some(now);
            }
            (Some(o), Some(n), Some(now)) if n > o => self.last_upgrade = Some(now),
            _ => {}
        }
        self.target = new;
        self.last_keyframe_request = None;
        if new.is_none() {
            self.current = None;
        }
    }

    fn is_candidate(&self, layer: SpatialLayer) -> bool {
        self.max.is_some_and(|m| layer <= m)
            && self
                .allocation
                .as_ref()
                .is_none_or(|a| a.rate(layer.0).is_some())
    }

    fn choose(&self, now: Option<Instant>) -> Option<SpatialLayer> {
        let max = self.max?;
        let Some(a) = &self.allocation else {
            return Some(SpatialLayer(0));
        };
        let fits = |rate: Bitrate, margin_percent: u64| {
            u128::from(rate.as_bps()) * u128::from(margin_percent)
                <= u128::from(a.budget.as_bps()) * 100
        };
        let upgrade_allowed = |now: Option<Instant>| {
            now.is_some_and(|now| {
                self.last_downgrade
                    .is_none_or(|d| now.saturating_duration_since(d) >= self.hold_off)
            })
        };
        let mut lowest = None;
        let mut best = None;
        for l in 0..=max.0 {
            let Some(rate) = a.rate(l) else { continue };
            let layer = SpatialLayer(l);
            lowest = lowest.or(Some(layer));
            let ok = match self.target {
                Some(t) if layer > t => {
                    upgrade_allowed(now) && fits(rate, self.config.upgrade_margin_percent)
                }
                _ => fits(rate, 100),
            };
            if ok {
                best = Some(layer);
            }
        }
        best.or(lowest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L0: SpatialLayer = SpatialLayer(0);
    const L1: SpatialLayer = SpatialLayer(1);
    const L2: SpatialLayer = SpatialLayer(2);
    const FWD: Decision = Decision::Forward { switch: false };
    const SWITCH: Decision = Decision::Forward { switch: true };
    const DROP: Decision = Decision::Drop;

    /// Typical 3-layer simulcast: 150 kbps, 500 kbps, 1.5 Mbps.
    fn rates() -> [Option<Bitrate>; 3] {
        [
            Some(Bitrate::kbps(150)),
            Some(Bitrate::kbps(500)),
            Some(Bitrate::kbps(1500)),
        ]
    }

    struct Clock(Instant);
    impl Clock {
        fn at(&self, ms: u64) -> Instant {
            self.0 + Duration::from_millis(ms)
        }
    }

    /// Drives packets of all layers (delta frames, plus a keyframe on `key`) and returns the
    /// decisions per layer.
    fn packets(s: &mut LayerSelector, key: Option<SpatialLayer>, now: Instant) -> [Decision; 3] {
        [L0, L1, L2].map(|l| s.handle_packet(l, key == Some(l), now))
    }

    #[test]
    fn starts_at_layer_zero_on_its_keyframe() {
        let c = Clock(Instant::now());
        let mut s = LayerSelector::new(3);
        assert_eq!((s.target(), s.current()), (Some(L0), None));
        assert_eq!(s.poll_keyframe_request(c.at(0)), Some(L0));
        assert_eq!(packets(&mut s, None, c.at(1)), [DROP; 3]);
        assert_eq!(packets(&mut s, Some(L1), c.at(2)), [DROP; 3]);
        assert_eq!(packets(&mut s, Some(L0), c.at(3)), [SWITCH, DROP, DROP]);
        assert_eq!(packets(&mut s, None, c.at(4)), [FWD, DROP, DROP]);
        assert_eq!(s.current(), Some(L0));
        assert_eq!(s.poll_keyframe_request(c.at(5)), None);
    }

    #[test]
    fn upgrade_switches_only_at_target_keyframe() {
        let c = Clock(Instant::now());
        let mut s = LayerSelector::new(3);
        s.handle_packet(L0, true, c.at(0));
        s.handle_allocation(Bitrate::kbps(2000), &rates(), c.at(0));
        assert_eq!((s.target(), s.current()), (Some(L2), Some(L0)));
        // Keep forwarding layer 0 meanwhile; a keyframe of layer 1 is not the target.
        assert_eq!(packets(&mut s, Some(L1), c.at(10)), [FWD, DROP, DROP]);
        assert_eq!(s.poll_keyframe_request(c.at(10)), Some(L2));
        assert_eq!(s.poll_keyframe_request(c.at(500)), None);
        assert_eq!(s.poll_keyframe_request(c.at(1010)), Some(L2));
        // (Layer 0's packet of this round arrives before the switch.)
        assert_eq!(packets(&mut s, Some(L2), c.at(1100)), [FWD, DROP, SWITCH]);
        assert_eq!(packets(&mut s, Some(L2), c.at(1110)), [DROP, DROP, FWD]);
        assert_eq!(s.current(), Some(L2));
        assert_eq!(s.poll_keyframe_request(c.at(5000)), None);
    }

    #[test]
    fn budget_table() {
        // (target before, budget kbps, target after): margin up, immediate down, lowest when
        // nothing fits.
        let cases = [
            (L0, 574, L0), // 500 * 1.15 = 575 needed for layer 1
            (L0, 575, L1),
            (L1, 1724, L1), // 1500 * 1.15 = 1725 needed for layer 2
            (L1, 1725, L2),
            (L1, 500, L1), // staying needs no margin
            (L1, 499, L0), // down at once
            (L2, 1500, L2),
            (L2, 1499, L1),
            (L2, 100, L0), // nothing fits: lowest, not paused
            (L1, 0, L0),
        ];
        for (i, (before, budget, after)) in cases.into_iter().enumerate() {
            let c = Clock(Instant::now());
            let mut s = LayerSelector::new(3);
            // Reach `before` without any downgrade in the history.
            let reach = match before {
                L0 => 150,
                L1 => 600,
                _ => 10_000,
            };
            s.handle_allocation(Bitrate::kbps(reach), &rates(), c.at(0));
            assert_eq!(s.target(), Some(before), "case {i} setup");
            s.handle_allocation(Bitrate::kbps(budget), &rates(), c.at(100));
            assert_eq!(s.target(), Some(after), "case {i}");
        }
    }

    #[test]
    fn downgrade_waits_for_lower_keyframe_and_keeps_asking() {
        let c = Clock(Instant::now());
        let mut s = LayerSelector::new(3);
        s.handle_allocation(Bitrate::kbps(3000), &rates(), c.at(0));
        assert_eq!(packets(&mut s, Some(L2), c.at(0)), [DROP, DROP, SWITCH]);
        s.handle_allocation(Bitrate::kbps(600), &rates(), c.at(1000));
        assert_eq!(s.target(), Some(L1));
        // Still forwarding layer 2 until layer 1's keyframe; requests re-fire every second.
        let mut asked = Vec::new();
        for ms in (1000..4000).step_by(100) {
            assert_eq!(packets(&mut s, None, c.at(ms)), [DROP, DROP, FWD]);
            if let Some(l) = s.poll_keyframe_request(c.at(ms)) {
                asked.push((ms, l));
            }
        }
        assert_eq!(asked, vec![(1000, L1), (2000, L1), (3000, L1)]);
        assert_eq!(packets(&mut s, Some(L1), c.at(4000)), [DROP, SWITCH, DROP]);
        assert_eq!(packets(&mut s, Some(L2), c.at(4010)), [DROP, FWD, DROP]);
    }

    #[test]
    fn hold_off_and_exponential_backoff() {
        let c = Clock(Instant::now());
        let mut s = LayerSelector::new(3);
        let high = Bitrate::kbps(3000);
        let low = Bitrate::kbps(1000); // fits layer 1, not layer 2
        s.handle_allocation(high, &rates(), c.at(0));
        assert_eq!(s.target(), Some(L2));
        // Stable for 20 s, then the first budget downgrade: hold-off is the initial 2 s.
        s.handle_allocation(low, &rates(), c.at(20_000));
        assert_eq!(s.target(), Some(L1));
        assert_eq!(s.hold_off(), Duration::from_secs(2));

        // A capped link: every upgrade is followed by a downgrade 1 s later. The hold-off
        // doubles each time up to 16 s, and no upgrade happens before it elapses.
        let mut t = 20_000;
        let mut upgrades = Vec::new();
        for _ in 0..8 {
            let hold = s.hold_off().as_millis() as u64;
            s.handle_allocation(high, &rates(), c.at(t + hold - 1));
            assert_eq!(
                s.target(),
                Some(L1),
                "no upgrade before the hold-off ({hold} ms)"
            );
            t += hold;
            s.handle_allocation(high, &rates(), c.at(t));
            assert_eq!(s.target(), Some(L2));
            upgrades.push(hold / 1000);
            t += 1000;
            s.handle_allocation(low, &rates(), c.at(t));
            assert_eq!(s.target(), Some(L1));
        }
        assert_eq!(upgrades, vec![2, 4, 8, 16, 16, 16, 16, 16]);

        // The upgrade holds past the oscillation window: the next downgrade resets the hold-off.
        t += 30_000;
        s.handle_allocation(high, &rates(), c.at(t));
        assert_eq!(s.target(), Some(L2));
        t += 6_000;
        s.handle_allocation(low, &rates(), c.at(t));
        assert_eq!(s.hold_off(), Duration::from_secs(2));
    }

    #[test]
    fn paused_and_resumed() {
        let c = Clock(Instant::now());
        let mut s = LayerSelector::new(3);
        s.handle_allocation(Bitrate::kbps(800), &rates(), c.at(0));
        assert_eq!(packets(&mut s, Some(L1), c.at(0)), [DROP, SWITCH, DROP]);
        s.set_max_layer(None);
        assert_eq!((s.target(), s.current()), (None, None));
        assert_eq!(packets(&mut s, Some(L1), c.at(10)), [DROP; 3]);
        assert_eq!(s.poll_keyframe_request(c.at(10)), None);
        s.handle_allocation(Bitrate::kbps(5000), &rates(), c.at(20));
        assert_eq!(s.target(), None, "allocation does not unpause");
        // Resume: best layer that fits the last allocation, via a keyframe.
        s.set_max_layer(Some(L2));
        assert_eq!(s.target(), Some(L2));
        assert_eq!(s.poll_keyframe_request(c.at(30)), Some(L2));
        assert_eq!(packets(&mut s, None, c.at(40)), [DROP; 3]);
        assert_eq!(packets(&mut s, Some(L2), c.at(50)), [DROP, DROP, SWITCH]);
    }

    #[test]
    fn max_layer_caps_without_hold_off() {
        let c = Clock(Instant::now());
        let mut s = LayerSelector::new(3);
        s.handle_allocation(Bitrate::kbps(5000), &rates(), c.at(0));
        s.handle_packet(L2, true, c.at(0));
        // Smaller tile: target drops at once, current keeps flowing until layer 0's keyframe.
        s.set_max_layer(Some(L0));
        assert_eq!((s.target(), s.current()), (Some(L0), Some(L2)));
        assert_eq!(packets(&mut s, Some(L1), c.at(10)), [DROP, DROP, FWD]);
        assert_eq!(packets(&mut s, Some(L0), c.at(20)), [SWITCH, DROP, DROP]);
        // Bigger tile again: not a budget downgrade, so the upgrade is not held off; it waits
        // for the next allocation.
        s.set_max_layer(Some(SpatialLayer(7)));
        assert_eq!(s.max_layer(), Some(L2));
        assert_eq!(s.target(), Some(L0));
        s.handle_allocation(Bitrate::kbps(5000), &rates(), c.at(30));
        assert_eq!(s.target(), Some(L2));
    }

    #[test]
    fn disappearing_layers() {
        let c = Clock(Instant::now());
        let mut s = LayerSelector::new(3);
        let no_top = [rates()[0], rates()[1], None];
        s.handle_allocation(Bitrate::kbps(5000), &no_top, c.at(0));
        assert_eq!(s.target(), Some(L1), "a layer not received is not a target");
        assert_eq!(packets(&mut s, Some(L1), c.at(0)), [DROP, SWITCH, DROP]);
        // The current layer disappears: the best remaining layer at its next keyframe.
        s.handle_allocation(Bitrate::kbps(5000), &[rates()[0], None, None], c.at(100));
        assert_eq!((s.target(), s.current()), (Some(L0), None));
        assert_eq!(s.poll_keyframe_request(c.at(100)), Some(L0));
        assert_eq!(packets(&mut s, None, c.at(110)), [DROP; 3]);
        assert_eq!(packets(&mut s, Some(L0), c.at(120)), [SWITCH, DROP, DROP]);
        // Everything disappears: nothing to forward, nothing to ask for.
        s.handle_allocation(Bitrate::kbps(5000), &[None, None, None], c.at(200));
        assert_eq!((s.target(), s.current()), (None, None));
        assert_eq!(s.poll_keyframe_request(c.at(200)), None);
        // Layers return: upgrades apply (not held off: nothing was budget-driven).
        s.handle_allocation(Bitrate::kbps(5000), &rates(), c.at(300));
        assert_eq!(s.target(), Some(L2));
        // With nothing flowing, a lower layer's keyframe starts video while we wait for the top.
        assert_eq!(packets(&mut s, Some(L0), c.at(310)), [SWITCH, DROP, DROP]);
        assert_eq!(s.poll_keyframe_request(c.at(310)), Some(L2));
        assert_eq!(packets(&mut s, Some(L2), c.at(320)), [FWD, DROP, SWITCH]);
        assert_eq!(packets(&mut s, None, c.at(330)), [DROP, DROP, FWD]);
    }

    #[test]
    fn odd_inputs() {
        let c = Clock(Instant::now());
        // A plain video track, a zero layer count, and bitrate slices of the wrong length.
        let mut s = LayerSelector::new(0);
        s.handle_allocation(Bitrate::kbps(100), &rates(), c.at(0));
        assert_eq!(s.target(), Some(L0));
        assert_eq!(s.handle_packet(L1, true, c.at(0)), DROP);
        assert_eq!(s.handle_packet(L0, true, c.at(0)), SWITCH);
        let mut s = LayerSelector::new(3);
        s.handle_allocation(Bitrate::kbps(5000), &rates()[..2], c.at(0));
        assert_eq!(s.target(), Some(L1));
        s.handle_allocation(
            Bitrate::bps(u64::MAX),
            &[Some(Bitrate::bps(u64::MAX)); 9],
            c.at(0),
        );
        assert_eq!(s.target(), Some(L1), "margin arithmetic does not overflow");
        assert_eq!(s.handle_packet(SpatialLayer(200), true, c.at(0)), DROP);
    }
}
