//! A run's kernel choices travel in its checkpoints' metadata, so that resuming or sampling from a
//! checkpoint on the adapter that made it uses the same kernels for every shape the run tuned, and
//! repeats its numbers bit for bit even if the tuner (or a newer cache) would choose differently.
//! On another adapter the record is only a notice: the kernels are tuned there afresh.

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};

use crate::gpu::Context;

/// The checkpoint metadata key holding a [`Record`] as JSON.
pub const METADATA_KEY: &str = "kernel_variants";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// [`adapter_id`] of the device that chose them.
    pub adapter: String,
    /// Variant name by tuning key.
    pub variants: BTreeMap<String, String>,
}

/// Adapter, backend, device type, driver and driver version: what a choice is valid for.
pub fn adapter_id(ctx: &Context) -> String {
    format!("{} {}", ctx.describe(), ctx.adapter.driver_info)
}

/// The variants chosen on `ctx` so far (pinned ones included), as metadata JSON; None if no
/// kernel had alternatives.
pub fn record_json(ctx: &Context) -> Option<String> {
    let variants = super::tuning(ctx).lock().unwrap().chosen.clone();
    if variants.is_empty() {
        return None;
    }
    let record = Record { adapter: adapter_id(ctx), variants };
    Some(serde_json::to_string(&record).expect("a record serialises"))
}

/// Pin the variants recorded in `metadata` (a checkpoint's, read from `source`) if they were chosen
/// on this adapter; returns how many were pinned. Choices already pinned (a run folder's record)
/// win over the checkpoint's.
pub fn pin_recorded(
    ctx: &Context,
    metadata: &std::collections::HashMap<String, String>,
    source: &str,
) -> Result<usize> {
    let Some(json) = metadata.get(METADATA_KEY) else { return Ok(0) };
    let record: Record = serde_json::from_str(json).map_err(|e| {
        anyhow!(
            "{source}: metadata field '{METADATA_KEY}' is not a kernel record ({e}); delete the field to tune afresh"
        )
    })?;
    if record.adapter != adapter_id(ctx) {
        eprintln!(
            "note: {source} recorded its kernels on {}; choosing them for {} instead",
            record.adapter,
            ctx.describe()
        );
        return Ok(0);
    }
    let state = super::tuning(ctx);
    let mut tuning = state.lock().unwrap();
    let before = tuning.pinned.len();
    for (key, name) in record.variants {
        tuning.pinned.entry(key).or_insert(name);
    }
    Ok(tuning.pinned.len() - before)
}
