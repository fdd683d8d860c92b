//! A U-Net's state_dict entries, declared by its builder where it builds each module, so the
//! checkpoint's tensor list, the fresh weights and the graph's parameters come from one place.
//!
//! A builder runs twice: recording ([`Params::recording`]), it only declares each module's
//! entries, in the reference's registration order (the state_dict's: the fresh weights draw
//! their random values in this order, checkpoints list it); building ([`Params::building`] with
//! the recorded entries), it declares them again (checked against the record, so the two passes
//! cannot drift) and makes graph tensors of the ones the graph uses.

use std::collections::BTreeMap;

use crate::graph::{Graph, TensorId};

/// What kind of state_dict entry a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Trained by the optimizer.
    Trainable,
    /// In `.parameters()` but frozen (the sinusoidal table).
    Frozen,
    /// BatchNorm running_mean / running_var (buffers).
    RunningStat,
    /// BatchNorm num_batches_tracked (int64 buffer).
    Counter,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: EntryKind,
}

/// The time embedding's table, frozen in `.parameters()` (both U-Nets).
pub(crate) const TIME_TABLE: &str = "time_embedding.timembedding.0.weight";

pub(crate) struct Params {
    /// Building: the recorded entries, checked one by one as the build declares them again.
    record: Option<Vec<Entry>>,
    /// Declared so far, in declaration order.
    entries: Vec<Entry>,
    /// Shapes of every entry but the counters (host-side bookkeeping, never in the graph).
    shapes: BTreeMap<String, Vec<usize>>,
    /// Graph tensors of the entries used so far, by name.
    pub ids: BTreeMap<String, TensorId>,
}

impl Params {
    /// The recording pass: declarations only, no graph.
    pub fn recording() -> Params {
        Params { record: None, entries: Vec::new(), shapes: BTreeMap::new(), ids: BTreeMap::new() }
    }

    /// The building pass over `recorded` (the recording pass's [`Self::entries`]).
    pub fn building(recorded: Vec<Entry>) -> Params {
        let shapes = recorded
            .iter()
            .filter(|e| e.kind != EntryKind::Counter)
            .map(|e| (e.name.clone(), e.shape.clone()))
            .collect();
        Params { record: Some(recorded), entries: Vec::new(), shapes, ids: BTreeMap::new() }
    }

    /// Recording: the builder declares its modules and returns before touching the graph.
    pub fn is_recording(&self) -> bool {
        self.record.is_none()
    }

    /// Recording: every entry declared, in declaration order (the state_dict's).
    pub fn entries(self) -> Vec<Entry> {
        assert!(self.is_recording(), "entries come from the recording pass");
        self.entries
    }

    /// Building: the graph tensors of the entries used, by name, once the build has declared
    /// every recorded entry.
    pub fn finish(self) -> BTreeMap<String, TensorId> {
        let recorded = self.record.as_ref().map_or(0, |r| r.len());
        assert_eq!(self.entries.len(), recorded, "the U-Net's build declared fewer entries than its record");
        self.ids
    }

    fn push(&mut self, name: String, shape: Vec<usize>, kind: EntryKind) {
        let e = Entry { name, shape, kind };
        if let Some(record) = &self.record {
            let want = record.get(self.entries.len());
            assert_eq!(want, Some(&e), "the U-Net's build and its record declare different entries");
        } else {
            self.shapes.insert(e.name.clone(), e.shape.clone());
        }
        self.entries.push(e);
    }

    /// `{name}.weight` of `shape` and `{name}.bias` [shape[0]]: a conv or linear.
    pub fn weighted(&mut self, name: &str, shape: Vec<usize>) {
        let out = shape[0];
        self.push(format!("{name}.weight"), shape, EntryKind::Trainable);
        self.push(format!("{name}.bias"), vec![out], EntryKind::Trainable);
    }

    /// A k x k conv cin -> cout with bias.
    pub fn conv(&mut self, name: &str, cout: usize, cin: usize, k: usize) {
        self.weighted(name, vec![cout, cin, k, k]);
    }

    /// A Linear inp -> out with bias.
    pub fn linear(&mut self, name: &str, out: usize, inp: usize) {
        self.weighted(name, vec![out, inp]);
    }

    /// A norm's affine weight and bias over `c` channels (GroupNorm).
    pub fn affine(&mut self, name: &str, c: usize) {
        self.push(format!("{name}.weight"), vec![c], EntryKind::Trainable);
        self.push(format!("{name}.bias"), vec![c], EntryKind::Trainable);
    }

    /// A BatchNorm over `c` channels: the affine pair, the running statistics and the counter.
    pub fn batchnorm(&mut self, name: &str, c: usize) {
        self.affine(name, c);
        self.push(format!("{name}.running_mean"), vec![c], EntryKind::RunningStat);
        self.push(format!("{name}.running_var"), vec![c], EntryKind::RunningStat);
        self.push(format!("{name}.num_batches_tracked"), vec![], EntryKind::Counter);
    }

    /// The time embedding both U-Nets share: the frozen sinusoidal table [steps, ch], then
    /// Linear ch -> tdim, Swish, Linear tdim -> tdim (`time_embedding.timembedding.{0,1,3}`).
    pub fn time_embedding(&mut self, steps: usize, ch: usize, tdim: usize) {
        self.push(TIME_TABLE.into(), vec![steps, ch], EntryKind::Frozen);
        self.linear("time_embedding.timembedding.1", tdim, ch);
        self.linear("time_embedding.timembedding.3", tdim, tdim);
    }

    /// The shape of a declared entry.
    pub fn shape(&self, name: &str) -> &[usize] {
        self.shapes.get(name).unwrap_or_else(|| panic!("the U-Net has no parameter {name}"))
    }

    /// The graph tensor of entry `name`, made on first use (tensors that inference folds away
    /// never take memory).
    pub fn get(&mut self, g: &mut Graph, name: &str) -> TensorId {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = g.param(name, self.shape(name));
        self.ids.insert(name.to_string(), id);
        id
    }

    /// Training updates every parameter and statistic: make them all now, by name.
    pub fn declare_all(&mut self, g: &mut Graph) {
        let names: Vec<String> = self.shapes.keys().cloned().collect();
        for n in names {
            self.get(g, &n);
        }
    }
}
