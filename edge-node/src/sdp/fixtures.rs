//! SDP samples for the tests. `chrome_*` were written by headless Chromium 156 and `aiortc_*` by
//! aiortc 1.16 (generated on loopback, see testdata/README.md; the `*_subscriber_answer`s are
//! those clients' answers to our own subscriber offer); the others are hand-written in the shape
//! of Firefox, OBS (libdatachannel) and munged legacy-simulcast Chrome offers.

pub(crate) const CHROME_PUBLISH_SIMULCAST: &str =
    include_str!("testdata/chrome_publish_simulcast_offer.sdp");
pub(crate) const CHROME_PUBLISH_DATACHANNEL: &str =
    include_str!("testdata/chrome_publish_datachannel_offer.sdp");
pub(crate) const CHROME_WHEP: &str = include_str!("testdata/chrome_whep_offer.sdp");
pub(crate) const AIORTC_PUBLISH: &str = include_str!("testdata/aiortc_publish_offer.sdp");
pub(crate) const AIORTC_PUBLISH_SENDONLY: &str =
    include_str!("testdata/aiortc_publish_sendonly_offer.sdp");
pub(crate) const AIORTC_WHEP: &str = include_str!("testdata/aiortc_whep_offer.sdp");
pub(crate) const FIREFOX_STYLE: &str = include_str!("testdata/firefox_style_publish_offer.sdp");
pub(crate) const LEGACY_SIM: &str = include_str!("testdata/legacy_sim_offer.sdp");
pub(crate) const OBS_WHIP: &str = include_str!("testdata/obs_whip_offer.sdp");
pub(crate) const CHROME_SUBSCRIBER_ANSWER: &str =
    include_str!("testdata/chrome_subscriber_answer.sdp");
pub(crate) const AIORTC_SUBSCRIBER_ANSWER: &str =
    include_str!("testdata/aiortc_subscriber_answer.sdp");
