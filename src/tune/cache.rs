//! The persistent tuning cache: one JSON file per adapter and driver under $SDDPM_CACHE_DIR
//! (default: the platform cache folder + sddpm-gpu/), readable as a report: for every tuning key
//! the choice, every candidate's time and (for keys that hold for every batch size) the shapes it
//! was timed on, plus the adapter's measured peak.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::gpu::Context;

/// An adapter's measured fp32 FMA rate and memory bandwidth (the calibration kernels' best run:
/// crate::profile::measure_peak), kept in the cache beside the tuning results.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Peak {
    pub gflops: f64,
    pub gbps: f64,
    /// Measured with GPU timestamps (false: host timers, which include submit overhead and so
    /// understate the peak).
    pub gpu_timestamps: bool,
}

/// Changes when the file's meaning changes; a file with another format is rewritten.
const FORMAT: &str = "sddpm-gpu tuning cache 1";

/// One candidate's best time over its timed runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timed {
    pub variant: String,
    pub us: f64,
}

/// The tuning result of one key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub choice: String,
    pub candidates: Vec<Timed>,
    /// The exact shapes the candidates were timed on, when the key holds for every batch size
    /// (`4B` in the key: see crate::tune::general_key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timed_on: Option<String>,
}

/// The verdict of a variant's self-check on this adapter (crate::graph::Needs::check).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub passed: bool,
    /// The measured error, or why the check could not run.
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct File {
    format: String,
    adapter: String,
    backend: String,
    driver: String,
    driver_info: String,
    #[serde(default)]
    peak: Option<Peak>,
    #[serde(default)]
    shapes: BTreeMap<String, Entry>,
    /// Self-check verdicts by check key.
    #[serde(default)]
    checks: BTreeMap<String, Verdict>,
}

/// The cache of one adapter, loaded (or started empty) and saved whole.
#[derive(Debug)]
pub struct Cache {
    path: Option<PathBuf>,
    file: File,
    dirty: bool,
}

/// Where the cache files live: `explicit`, else $SDDPM_CACHE_DIR, else the platform cache folder.
pub fn cache_dir(explicit: Option<&Path>) -> Option<PathBuf> {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("SDDPM_CACHE_DIR").filter(|v| !v.is_empty()).map(PathBuf::from))
        .or_else(|| dirs::cache_dir().map(|d| d.join("sddpm-gpu")))
}

/// A file name safe on every platform that still says which adapter it is for.
fn file_name(ctx: &Context) -> String {
    let a = &ctx.adapter;
    let ident = format!("{}-{:?}-{}-{}", a.name, a.backend, a.driver, a.driver_info);
    let slug: String = ident
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' { c.to_ascii_lowercase() } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    format!("tune-{}.json", &slug[..slug.len().min(96)])
}

impl Cache {
    /// Load the cache of `ctx`'s adapter. A missing file starts empty; an unreadable, corrupt or
    /// foreign one (another adapter, driver or format) is ignored with a one-line notice and will
    /// be rewritten on save.
    pub fn open(ctx: &Context) -> Cache {
        let dir = cache_dir(super::tuning(ctx).lock().unwrap().cache_dir.as_deref());
        let a = &ctx.adapter;
        let fresh = File {
            format: FORMAT.into(),
            adapter: a.name.clone(),
            backend: format!("{:?}", a.backend),
            driver: a.driver.clone(),
            driver_info: a.driver_info.clone(),
            peak: None,
            shapes: BTreeMap::new(),
            checks: BTreeMap::new(),
        };
        let Some(dir) = dir else {
            eprintln!("note: no cache folder on this platform; set SDDPM_CACHE_DIR to keep tuning results");
            return Cache { path: None, file: fresh, dirty: false };
        };
        let path = dir.join(file_name(ctx));
        let file = match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fresh,
            Err(e) => {
                eprintln!("note: ignoring tuning cache {} ({e}); it will be rewritten", path.display());
                fresh
            }
            Ok(bytes) => match serde_json::from_slice::<File>(&bytes) {
                Err(e) => {
                    eprintln!("note: ignoring corrupt tuning cache {} ({e}); it will be rewritten", path.display());
                    fresh
                }
                Ok(f)
                    if (&f.format, &f.adapter, &f.backend, &f.driver, &f.driver_info)
                        != (&fresh.format, &fresh.adapter, &fresh.backend, &fresh.driver, &fresh.driver_info) =>
                {
                    eprintln!(
                        "note: ignoring tuning cache {} (written for '{}' {} {}, format '{}'); it will be rewritten",
                        path.display(),
                        f.adapter,
                        f.driver,
                        f.driver_info,
                        f.format
                    );
                    fresh
                }
                Ok(f) => f,
            },
        };
        Cache { path: Some(path), file, dirty: false }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The entry for `key`, if it was tuned over exactly the candidates `names` (a build that
    /// offers other variants must re-tune).
    pub fn get(&self, key: &str, names: &[&str]) -> Option<&Entry> {
        self.file.shapes.get(key).filter(|e| {
            e.candidates.len() == names.len()
                && e.candidates.iter().zip(names).all(|(c, n)| c.variant == *n)
                && names.contains(&e.choice.as_str())
        })
    }

    pub fn insert(&mut self, key: String, entry: Entry) {
        self.file.shapes.insert(key, entry);
        self.dirty = true;
    }

    /// The cached self-check verdict of check key `key`.
    pub fn check(&self, key: &str) -> Option<Verdict> {
        self.file.checks.get(key).cloned()
    }

    pub fn insert_check(&mut self, key: String, verdict: Verdict) {
        self.file.checks.insert(key, verdict);
        self.dirty = true;
    }

    pub fn peak(&self) -> Option<Peak> {
        self.file.peak
    }

    pub fn set_peak(&mut self, peak: Peak) {
        self.file.peak = Some(peak);
        self.dirty = true;
    }

    /// Write the file (temp file + rename) if anything changed. Failing to write only costs the
    /// next run a re-tune, so it is a notice, not an error.
    pub fn save(&mut self) {
        let Some(path) = &self.path else { return };
        if !self.dirty {
            return;
        }
        let json = serde_json::to_string_pretty(&self.file).expect("the cache serialises");
        match crate::fsutil::write_atomic(path, json.as_bytes()) {
            Ok(()) => self.dirty = false,
            Err(e) => eprintln!(
                "note: cannot write tuning cache ({e:#}); set SDDPM_CACHE_DIR to a writable folder to keep tuning results"
            ),
        }
    }
}
