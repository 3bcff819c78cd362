//! Scenarios: who joins, when, what they publish and receive, and for how long.
//!
//! A scenario is a list of participant groups plus run settings, written in TOML or built by
//! the presets (`conference`, `webinar`, `join-storm`, `capacity`). A file with a mistake is
//! rejected with the line and the field: unknown keys and wrong types by the TOML reader
//! (`deny_unknown_fields`), values out of range by [`Scenario::from_toml`]'s checks, which carry
//! the span of the offending value.
//!
//! ```toml
//! name = "webinar"
//! room = "loadtest"
//! mode = "ws"              # ws (WebSocket signaling) | whip (WHIP publishers, WHEP viewers)
//! duration = "20s"         # media time after the last join
//! nack = true              # receivers ask for lost packets (RFC 4585 generic NACK)
//!
//! [[group]]
//! name = "presenters"
//! count = 1
//! publish = "camera"       # none | audio | camera | camera-single | screen
//! subscribe = false
//!
//! [[group]]
//! name = "viewers"
//! count = 50
//! subscribe = true
//! max_layer = 2            # highest simulcast layer wanted (0 = lowest)
//! join_rate = 25.0         # joins per second
//! start = "1s"             # after the run starts
//!
//! [capacity]               # optional: ramp a group in steps until a limit is crossed
//! group = "viewers"
//! step = 10
//! step_duration = "5s"
//! max_loss = 0.01
//! max_p99_ms = 50.0
//! ```

use serde::{Deserialize, Serialize};
use std::time::Duration;
use toml::Spanned;

/// What a participant publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Publish {
    None,
    Audio,
    /// Audio and three-layer simulcast camera video.
    Camera,
    /// Audio and one camera layer (the top one).
    CameraSingle,
    /// Screen share video (one layer, low frame rate) and audio.
    Screen,
}

impl Publish {
    pub fn audio(self) -> bool {
        !matches!(self, Publish::None)
    }

    pub fn video_layers(self) -> u8 {
        match self {
            Publish::None | Publish::Audio => 0,
            Publish::Camera => 3,
            Publish::CameraSingle | Publish::Screen => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// WebSocket signaling (`/ws`): join, produce, consume with renegotiation.
    #[default]
    Ws,
    /// WHIP publishers and WHEP viewers (viewers watch the first publisher).
    Whip,
}

/// A group of identical participants, as checked and converted.
#[derive(Debug, Clone, Serialize)]
pub struct Group {
    pub name: String,
    pub count: u32,
    pub publish: Publish,
    pub subscribe: bool,
    pub max_layer: Option<u8>,
    /// Joins per second (0 = all at once).
    pub join_rate: f64,
    #[serde(with = "millis")]
    pub start: Duration,
}

/// Capacity search: ramp `group` by `step` participants every `step_duration` and stop at the
/// first step whose window has loss above `max_loss` or p99 delay above `max_p99_ms`.
#[derive(Debug, Clone, Serialize)]
pub struct Capacity {
    pub group: String,
    pub step: u32,
    #[serde(with = "millis")]
    pub step_duration: Duration,
    pub max_loss: f64,
    pub max_p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub name: String,
    pub room: String,
    pub mode: Mode,
    #[serde(with = "millis")]
    pub duration: Duration,
    pub nack: bool,
    pub groups: Vec<Group>,
    pub capacity: Option<Capacity>,
}

mod millis {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileScenario {
    name: Option<String>,
    room: Option<String>,
    #[serde(default)]
    mode: Mode,
    duration: Option<Spanned<String>>,
    #[serde(default = "yes")]
    nack: bool,
    #[serde(default)]
    group: Vec<Spanned<FileGroup>>,
    capacity: Option<Spanned<FileCapacity>>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGroup {
    name: Option<String>,
    count: Spanned<i64>,
    #[serde(default = "no_publish")]
    publish: Publish,
    #[serde(default)]
    subscribe: bool,
    max_layer: Option<Spanned<i64>>,
    join_rate: Option<Spanned<f64>>,
    start: Option<Spanned<String>>,
}

fn no_publish() -> Publish {
    Publish::None
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCapacity {
    group: Spanned<String>,
    step: Spanned<i64>,
    step_duration: Option<Spanned<String>>,
    max_loss: Option<f64>,
    max_p99_ms: Option<f64>,
}

/// A scenario file that cannot be used, with the place and the reason.
#[derive(Debug, thiserror::Error)]
#[error("{path}: line {line}: {field}: {message}")]
pub struct ScenarioError {
    pub path: String,
    pub line: usize,
    pub field: String,
    pub message: String,
}

/// Parses "250ms", "20s", "2m", "1.5s".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("{s:?} has no unit (use ms, s or m)"))?;
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number followed by ms, s or m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("{s:?} is out of range (0 to 24 h)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl Scenario {
    pub fn from_toml(path: &str, text: &str) -> Result<Scenario, ScenarioError> {
        let line_of = |pos: usize| text[..pos.min(text.len())].matches('\n').count() + 1;
        let err = |pos: usize, field: String, message: String| ScenarioError {
            path: path.to_owned(),
            line: line_of(pos),
            field,
            message,
        };
        let file: FileScenario = toml::from_str(text).map_err(|e| {
            let pos = e.span().map_or(0, |s| s.start);
            err(pos, "(syntax)".to_owned(), e.message().to_owned())
        })?;
        let dur = |v: &Option<Spanned<String>>, field: &str, default: Duration| match v {
            None => Ok(default),
            Some(s) => {
                parse_duration(s.get_ref()).map_err(|m| err(s.span().start, field.to_owned(), m))
            }
        };
        let duration = dur(&file.duration, "duration", Duration::from_secs(20))?;
        if file.group.is_empty() {
            return Err(err(
                text.len(),
                "group".into(),
                "at least one [[group]] is needed".into(),
            ));
        }
        let mut groups = Vec::new();
        for (i, g) in file.group.iter().enumerate() {
            let at = g.span().start;
            let g = g.get_ref();
            let field = |f: &str| format!("group[{i}].{f}");
            let count = *g.count.get_ref();
            if !(1..=100_000).contains(&count) {
                return Err(err(
                    g.count.span().start,
                    field("count"),
                    format!("{count} is not in 1..=100000"),
                ));
            }
            let max_layer = match &g.max_layer {
                None => None,
                Some(l) if (0..=2).contains(l.get_ref()) => Some(*l.get_ref() as u8),
                Some(l) => {
                    return Err(err(
                        l.span().start,
                        field("max_layer"),
                        format!("{} is not 0, 1 or 2", l.get_ref()),
                    ))
                }
            };
            let join_rate = match &g.join_rate {
                None => 0.0,
                Some(r) if r.get_ref().is_finite() && *r.get_ref() >= 0.0 => *r.get_ref(),
                Some(r) => {
                    return Err(err(
                        r.span().start,
                        field("join_rate"),
                        "must be a number >= 0".into(),
                    ))
                }
            };
            if g.publish == Publish::None && !g.subscribe {
                return Err(err(
                    at,
                    field("publish"),
                    "a group must publish or subscribe (or both)".into(),
                ));
            }
            groups.push(Group {
                name: g.name.clone().unwrap_or_else(|| format!("group{i}")),
                count: count as u32,
                publish: g.publish,
                subscribe: g.subscribe,
                max_layer,
                join_rate,
                start: dur(&g.start, &field("start"), Duration::ZERO)?,
            });
        }
        let capacity = match &file.capacity {
            None => None,
            Some(c) => {
                let c = c.get_ref();
                if !groups.iter().any(|g| &g.name == c.group.get_ref()) {
                    return Err(err(
                        c.group.span().start,
                        "capacity.group".into(),
                        format!("no group named {:?}", c.group.get_ref()),
                    ));
                }
                if *c.step.get_ref() < 1 {
                    return Err(err(
                        c.step.span().start,
                        "capacity.step".into(),
                        "must be at least 1".into(),
                    ));
                }
                Some(Capacity {
                    group: c.group.get_ref().clone(),
                    step: *c.step.get_ref() as u32,
                    step_duration: dur(
                        &c.step_duration,
                        "capacity.step_duration",
                        Duration::from_secs(5),
                    )?,
                    max_loss: c.max_loss.unwrap_or(0.01),
                    max_p99_ms: c.max_p99_ms.unwrap_or(50.0),
                })
            }
        };
        Ok(Scenario {
            name: file.name.unwrap_or_else(|| "custom".into()),
            room: file.room.unwrap_or_else(|| "loadtest".into()),
            mode: file.mode,
            duration,
            nack: file.nack,
            groups,
            capacity,
        })
    }

    fn base(name: &str, duration: Duration, groups: Vec<Group>) -> Scenario {
        Scenario {
            name: name.into(),
            room: "loadtest".into(),
            mode: Mode::Ws,
            duration,
            nack: true,
            groups,
            capacity: None,
        }
    }

    /// `n` participants, each publishing camera + audio and receiving everyone else.
    pub fn conference(n: u32, duration: Duration) -> Scenario {
        Self::base(
            "conference",
            duration,
            vec![group(
                "participants",
                n,
                Publish::Camera,
                true,
                10.0,
                Duration::ZERO,
            )],
        )
    }

    /// `p` presenters publishing, `m` viewers receiving.
    pub fn webinar(p: u32, m: u32, duration: Duration) -> Scenario {
        Self::base(
            "webinar",
            duration,
            vec![
                group(
                    "presenters",
                    p,
                    Publish::Camera,
                    false,
                    10.0,
                    Duration::ZERO,
                ),
                group(
                    "viewers",
                    m,
                    Publish::None,
                    true,
                    50.0,
                    Duration::from_secs(1),
                ),
            ],
        )
    }

    /// One meeting for thousands: `presenters` publishing audio and simulcast camera, `viewers`
    /// receiving media (lowest layer: a large audience's thumbnail view), and `audience`
    /// signaling-only sessions that hold the connection, get the roster as batched deltas and
    /// every event, but no media (on one machine the media cannot scale as far as signaling;
    /// the report counts both). Joins at `join_rate` per second per group.
    /// `join_rate` is the media viewers' joins per second, `audience_join_rate` the
    /// signaling-only audience's: every join is a roster delta to every session already in,
    /// so the audience's rate sets the meeting's signaling load (O(joins/s x sessions)).
    pub fn town_hall(
        presenters: u32,
        viewers: u32,
        audience: u32,
        join_rate: f64,
        audience_join_rate: f64,
        duration: Duration,
    ) -> Scenario {
        let mut viewers_group = group(
            "viewers",
            viewers,
            Publish::None,
            true,
            join_rate,
            Duration::from_secs(1),
        );
        viewers_group.max_layer = Some(0);
        Self::base(
            "town-hall",
            duration,
            vec![
                group(
                    "presenters",
                    presenters,
                    Publish::Camera,
                    false,
                    10.0,
                    Duration::ZERO,
                ),
                viewers_group,
                group(
                    "audience",
                    audience,
                    Publish::None,
                    false,
                    audience_join_rate,
                    Duration::from_secs(1),
                ),
            ],
        )
    }

    /// One presenter, then `k` viewers joining within `within`.
    pub fn join_storm(k: u32, within: Duration, duration: Duration) -> Scenario {
        let rate = f64::from(k) / within.as_secs_f64().max(0.001);
        Self::base(
            "join-storm",
            duration,
            vec![
                group("presenter", 1, Publish::Camera, false, 0.0, Duration::ZERO),
                group(
                    "viewers",
                    k,
                    Publish::None,
                    true,
                    rate,
                    Duration::from_secs(1),
                ),
            ],
        )
    }

    /// One presenter; viewers ramp by `step` every `step_duration` up to `max`.
    pub fn capacity(max: u32, step: u32, step_duration: Duration) -> Scenario {
        let mut s = Self::base(
            "capacity",
            Duration::from_secs(2),
            vec![
                group("presenter", 1, Publish::Camera, false, 0.0, Duration::ZERO),
                group(
                    "viewers",
                    max,
                    Publish::None,
                    true,
                    0.0,
                    Duration::from_secs(1),
                ),
            ],
        );
        s.capacity = Some(Capacity {
            group: "viewers".into(),
            step,
            step_duration,
            max_loss: 0.01,
            max_p99_ms: 50.0,
        });
        s
    }

    pub fn participants(&self) -> u32 {
        self.groups.iter().map(|g| g.count).sum()
    }
}

fn group(
    name: &str,
    count: u32,
    publish: Publish,
    subscribe: bool,
    rate: f64,
    start: Duration,
) -> Group {
    Group {
        name: name.into(),
        count,
        publish,
        subscribe,
        max_layer: None,
        join_rate: rate,
        start,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "w"
duration = "3s"
[[group]]
name = "p"
count = 1
publish = "camera"
[[group]]
name = "v"
count = 5
subscribe = true
max_layer = 1
join_rate = 10.0
start = "500ms"
[capacity]
group = "v"
step = 2
"#;

    #[test]
    fn a_good_file_reads() {
        let s = Scenario::from_toml("good.toml", GOOD).unwrap();
        assert_eq!(s.participants(), 6);
        assert_eq!(s.groups[1].start, Duration::from_millis(500));
        assert_eq!(s.groups[1].max_layer, Some(1));
        assert_eq!(s.capacity.unwrap().step, 2);
        assert_eq!(s.duration, Duration::from_secs(3));
    }

    #[test]
    fn errors_name_the_line_and_field() {
        let cases = [
            // (edit, line, field, message fragment)
            (
                GOOD.replace("count = 5", "count = 0"),
                10,
                "group[1].count",
                "not in",
            ),
            (
                GOOD.replace("max_layer = 1", "max_layer = 7"),
                12,
                "group[1].max_layer",
                "0, 1 or 2",
            ),
            (
                GOOD.replace("start = \"500ms\"", "start = \"5 parsecs\""),
                14,
                "group[1].start",
                "unknown unit",
            ),
            (
                GOOD.replace("subscribe = true", "subscribe = true\nsubscibe = true"),
                12,
                "(syntax)",
                "unknown field `subscibe`",
            ),
            (
                GOOD.replace("count = 5", "count = \"five\""),
                10,
                "(syntax)",
                "invalid type",
            ),
            (
                GOOD.replace("group = \"v\"", "group = \"x\""),
                16,
                "capacity.group",
                "no group named",
            ),
        ];
        for (text, line, field, frag) in cases {
            let e = Scenario::from_toml("f.toml", &text).unwrap_err();
            assert_eq!((e.line, e.field.as_str()), (line, field), "{e}");
            assert!(e.message.contains(frag), "{e}");
            assert!(
                e.to_string().starts_with(&format!("f.toml: line {line}: ")),
                "{e}"
            );
        }
    }

    #[test]
    fn shipped_scenario_files_read() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            Scenario::from_toml(&path.display().to_string(), &text).unwrap();
            n += 1;
        }
        assert!(n >= 4);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("20").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
