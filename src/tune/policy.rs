//! The tuner's per-device policy and record: whether to time candidates, where the cache lives,
//! pinned and chosen variants, self-check verdicts. It is kept with the device it was made on
//! ([`Context::extension`]) so that every plan compiled on one context agrees, while the `gpu`
//! layer below knows nothing of it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::gpu::Context;

/// How kernel variants are chosen on one device (the tuner does the choosing; this carries the
/// policy and what was chosen). Which kernels may serve at all (SDDPM_KERNELS) is the device's
/// [`Context::kernels`]: it decides whether the device is opened with cooperative matrices.
#[derive(Debug, Clone, Default)]
pub struct Tuning {
    /// Time the candidates of each op family; false (`--no-tune`, SDDPM_NO_TUNE=1): every
    /// family's default, its variant 0.
    pub enabled: bool,
    /// Where the tuning cache lives; None: $SDDPM_CACHE_DIR, else the platform cache folder.
    pub cache_dir: Option<PathBuf>,
    /// Variants to use whatever the cache or timing says, by tuning key (a resumed run's record).
    pub pinned: BTreeMap<String, String>,
    /// Every variant chosen on this device so far, by tuning key (what a run records).
    pub chosen: BTreeMap<String, String>,
    /// Self-check verdicts (passed or not) of the variants that have one, by check key: each is
    /// announced once per context.
    pub checks: BTreeMap<String, bool>,
}

impl Tuning {
    /// Tuning on unless SDDPM_NO_TUNE is set to something other than "" or "0".
    pub fn from_env() -> Tuning {
        let off = std::env::var("SDDPM_NO_TUNE").is_ok_and(|v| !v.is_empty() && v != "0");
        Tuning { enabled: !off, ..Default::default() }
    }
}

/// The tuning policy and record of `ctx`'s device, made from the environment
/// ([`Tuning::from_env`]) on first use: `tuning(&ctx).lock().unwrap().enabled = false`.
pub fn tuning(ctx: &Context) -> Arc<Mutex<Tuning>> {
    ctx.extension(|| Mutex::new(Tuning::from_env()))
}
