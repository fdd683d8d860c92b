//! A pickle reader that understands only what a tensor state_dict needs: the opcodes torch.save
//! and torch.jit.save emit for dicts, lists, tuples, strings, numbers and tensors, and the globals
//! `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter`,
//! `torch.*Storage`, `torch.jit._pickle.build_*list` and TorchScript module classes
//! (`__torch__.*`, kept as inert records of their attributes). Any other global or opcode is an
//! error: nothing from the file is ever called or imported.
//!
//! The file is untrusted. Every read is bounds-checked, the stack and memo grow at most one entry
//! per opcode byte, shared objects are reference-counted (a memo entry fetched many times costs
//! nothing), copies of shared containers are budgeted, nesting is bounded ([`MAX_DEPTH`]), and
//! callers walk the result with a node budget.

use std::collections::HashMap;
use std::rc::Rc;

use anyhow::{anyhow, bail, Result};

/// Element type of a torch storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    U8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    fn from_storage(name: &str) -> Option<DType> {
        Some(match name {
            "FloatStorage" => DType::F32,
            "DoubleStorage" => DType::F64,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ByteStorage" => DType::U8,
            _ => return None,
        })
    }
}

/// A storage named by a persistent id: its bytes are the archive entry `data/<key>`.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    pub dtype: DType,
    pub key: String,
    pub numel: u64,
}

/// A tensor view of a storage (element offset, sizes, element strides).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: Rc<StorageRef>,
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

/// A global the reader accepts (anything else is an error).
#[derive(Debug, Clone, PartialEq)]
pub enum Global {
    RebuildTensor,
    RebuildParameter,
    Storage(DType),
    OrderedDict,
    BuildList,
    /// A TorchScript module class (`__torch__.*`).
    Class(Rc<str>),
}

/// What the reader builds.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<Vec<Value>>),
    Dict(Rc<Vec<(Value, Value)>>),
    /// An instance of a TorchScript module class and the attribute dict BUILD gave it.
    Object {
        class: Rc<str>,
        state: Rc<Value>,
    },
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    Global(Rc<Global>),
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end =
            self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| anyhow!("truncated pickle"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let len = rest.iter().take(256).position(|&b| b == b'\n').ok_or_else(|| anyhow!("bad GLOBAL name"))?;
        let s = std::str::from_utf8(&rest[..len]).map_err(|_| anyhow!("GLOBAL name is not UTF-8"))?;
        self.pos += len + 1;
        Ok(s)
    }
    fn string(&mut self, n: usize) -> Result<Value> {
        let s = std::str::from_utf8(self.take(n)?).map_err(|_| anyhow!("string is not UTF-8"))?;
        Ok(Value::Str(s.into()))
    }
}

fn global(module: &str, name: &str) -> Result<Global> {
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch.jit._pickle", n) if n.starts_with("build_") && n.ends_with("list") => Global::BuildList,
        ("torch", n) if DType::from_storage(n).is_some() => Global::Storage(DType::from_storage(n).unwrap()),
        (m, n) if m == "__torch__" || m.starts_with("__torch__.") => Global::Class(format!("{m}.{n}").into()),
        _ => bail!("pickle refers to {module}.{name}; only tensor state_dicts are read"),
    })
}

fn int(v: &Value) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::Bool(b) => Ok(*b as i64),
        other => bail!("expected an integer, got {}", kind(other)),
    }
}

fn uints(v: &Value) -> Result<Vec<u64>> {
    let items = match v {
        Value::Tuple(t) | Value::List(t) => t,
        other => bail!("expected a tuple of sizes, got {}", kind(other)),
    };
    items.iter().map(|x| u64::try_from(int(x)?).map_err(|_| anyhow!("negative size or stride"))).collect()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "a bool",
        Value::Int(_) => "an int",
        Value::Float(_) => "a float",
        Value::Str(_) => "a string",
        Value::Tuple(_) => "a tuple",
        Value::List(_) => "a list",
        Value::Dict(_) => "a dict",
        Value::Object { .. } => "a module",
        Value::Storage(_) => "a storage",
        Value::Tensor(_) => "a tensor",
        Value::Global(_) => "a class",
    }
}

fn call(f: &Global, args: &[Value]) -> Result<Value> {
    Ok(match f {
        Global::OrderedDict if args.is_empty() => Value::Dict(Rc::new(Vec::new())),
        Global::RebuildParameter if !args.is_empty() => args[0].clone(),
        Global::BuildList if args.len() == 1 => args[0].clone(),
        Global::RebuildTensor if args.len() >= 4 => {
            let Value::Storage(storage) = &args[0] else { bail!("tensor without a storage") };
            let offset = u64::try_from(int(&args[1])?).map_err(|_| anyhow!("negative storage offset"))?;
            let (shape, stride) = (uints(&args[2])?, uints(&args[3])?);
            if shape.len() != stride.len() {
                bail!("tensor with {} sizes and {} strides", shape.len(), stride.len());
            }
            Value::Tensor(Rc::new(TensorRef { storage: storage.clone(), offset, shape, stride }))
        }
        other => bail!("unsupported call of {other:?} with {} arguments", args.len()),
    })
}

fn persistent(pid: &Value) -> Result<Value> {
    let Value::Tuple(t) = pid else { bail!("persistent id is {}", kind(pid)) };
    match &t[..] {
        [Value::Str(tag), Value::Global(g), Value::Str(key), _location, numel] if &**tag == "storage" => {
            let Global::Storage(dtype) = **g else { bail!("persistent id names no storage type") };
            let numel = u64::try_from(int(numel)?).map_err(|_| anyhow!("negative storage size"))?;
            Ok(Value::Storage(Rc::new(StorageRef { dtype, key: key.to_string(), numel })))
        }
        _ => bail!("unsupported persistent id"),
    }
}

/// Deepest nesting of containers a pickle may build. A state_dict nests a few levels (a
/// TorchScript module tree a few dozen); dropping or walking a value recurses once per level, so
/// a bound here is what keeps a crafted 1,000,000-deep tuple from overflowing the stack.
pub const MAX_DEPTH: u32 = 200;

/// Most opcodes a pickle may run. Each makes at most one value (tens of bytes), so this bounds
/// the reader's memory whatever a deflated data.pkl expands to; a state_dict needs about 20 per
/// tensor (2^21: some 100,000 tensors).
pub const MAX_OPS: usize = 1 << 21;

/// A value on the stack or in the memo, with its nesting depth (0 for scalars).
#[derive(Clone)]
struct Item {
    v: Value,
    depth: u32,
}

/// Run the pickle in `data`; errors say what was wrong and where.
///
/// Memory stays proportional to the pickle and bounded: every opcode adds at most one stack or
/// memo entry, at most [`MAX_OPS`] run, and copies made when a shared (memoised) list or dict is
/// changed are counted against a budget of about one element per pickle byte.
pub fn load(data: &[u8]) -> Result<Value> {
    let mut r = Reader { data, pos: 0 };
    let mut stack: Vec<Item> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: HashMap<u32, Item> = HashMap::new();
    let mut copy_budget = data.len() + (1 << 16);
    for _ in 0..MAX_OPS {
        let at = r.pos;
        let op = r.u8()?;
        let step = (|| -> Result<bool> {
            let pop = |stack: &mut Vec<Item>| stack.pop().ok_or_else(|| anyhow!("stack underflow"));
            let pop_mark = |stack: &mut Vec<Item>, marks: &mut Vec<usize>| -> Result<Vec<Item>> {
                let m = marks.pop().ok_or_else(|| anyhow!("no MARK"))?;
                if m > stack.len() {
                    bail!("MARK beyond the stack");
                }
                Ok(stack.split_off(m))
            };
            let deeper = |items: &[Item]| -> Result<u32> {
                let d = 1 + items.iter().map(|i| i.depth).max().unwrap_or(0);
                if d > MAX_DEPTH {
                    bail!("the pickle nests containers more than {MAX_DEPTH} deep; not a state_dict");
                }
                Ok(d)
            };
            let scalar = |v: Value| Item { v, depth: 0 };
            // Changing a list or dict the memo also holds copies it (values are immutable and
            // shared); charge the copy so repeated MEMOIZE + APPEND cannot grow memory quadratically.
            let mut charge = |len: usize, shared: bool| -> Result<()> {
                if shared {
                    copy_budget = copy_budget
                        .checked_sub(len)
                        .ok_or_else(|| anyhow!("the pickle copies shared lists too often"))?;
                }
                Ok(())
            };
            match op {
                0x80 => {
                    if r.u8()? > 5 {
                        bail!("unknown pickle protocol");
                    }
                }
                b'c' => {
                    let (module, name) = (r.line()?, r.line()?);
                    stack.push(scalar(Value::Global(Rc::new(global(module, name)?))));
                }
                0x93 => {
                    let (name, module) = (pop(&mut stack)?, pop(&mut stack)?);
                    let (Value::Str(m), Value::Str(n)) = (&module.v, &name.v) else {
                        bail!("STACK_GLOBAL of non-strings")
                    };
                    stack.push(scalar(Value::Global(Rc::new(global(m, n)?))));
                }
                b'q' | b'r' | 0x94 => {
                    let key = match op {
                        b'q' => r.u8()? as u32,
                        b'r' => r.u32()?,
                        _ => memo.len() as u32,
                    };
                    let top = stack.last().ok_or_else(|| anyhow!("memoize on an empty stack"))?.clone();
                    memo.insert(key, top);
                }
                b'h' | b'j' => {
                    let key = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
                    stack.push(memo.get(&key).ok_or_else(|| anyhow!("memo {key} is not set"))?.clone());
                }
                b'(' => marks.push(stack.len()),
                b')' => stack.push(Item { v: Value::Tuple(Rc::new(Vec::new())), depth: 1 }),
                b']' => stack.push(Item { v: Value::List(Rc::new(Vec::new())), depth: 1 }),
                b'}' => stack.push(Item { v: Value::Dict(Rc::new(Vec::new())), depth: 1 }),
                b'N' => stack.push(scalar(Value::None)),
                0x88 => stack.push(scalar(Value::Bool(true))),
                0x89 => stack.push(scalar(Value::Bool(false))),
                b'K' => stack.push(scalar(Value::Int(r.u8()? as i64))),
                b'M' => stack.push(scalar(Value::Int(r.u16()? as i64))),
                b'J' => stack.push(scalar(Value::Int(r.u32()? as i32 as i64))),
                0x8a => {
                    let n = r.u8()? as usize;
                    if n > 8 {
                        bail!("integer of {n} bytes");
                    }
                    let bytes = r.take(n)?;
                    let mut buf = [if bytes.last().is_some_and(|&b| b & 0x80 != 0) { 0xff } else { 0 }; 8];
                    buf[..n].copy_from_slice(bytes);
                    stack.push(scalar(Value::Int(i64::from_le_bytes(buf))));
                }
                b'G' => stack.push(scalar(Value::Float(f64::from_be_bytes(r.take(8)?.try_into().unwrap())))),
                b'X' => {
                    let n = r.u32()? as usize;
                    stack.push(scalar(r.string(n)?));
                }
                0x8c => {
                    let n = r.u8()? as usize;
                    stack.push(scalar(r.string(n)?));
                }
                b't' | b'l' => {
                    let items = pop_mark(&mut stack, &mut marks)?;
                    let depth = deeper(&items)?;
                    let values = items.into_iter().map(|i| i.v).collect();
                    let v = if op == b't' { Value::Tuple(Rc::new(values)) } else { Value::List(Rc::new(values)) };
                    stack.push(Item { v, depth });
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if stack.len() < n {
                        bail!("stack underflow");
                    }
                    let items = stack.split_off(stack.len() - n);
                    let depth = deeper(&items)?;
                    stack.push(Item { v: Value::Tuple(Rc::new(items.into_iter().map(|i| i.v).collect())), depth });
                }
                b'a' | b'e' => {
                    let items = if op == b'a' { vec![pop(&mut stack)?] } else { pop_mark(&mut stack, &mut marks)? };
                    let depth = deeper(&items)?;
                    match stack.last_mut() {
                        Some(Item { v: Value::List(l), depth: d }) => {
                            charge(l.len(), Rc::strong_count(l) > 1)?;
                            Rc::make_mut(l).extend(items.into_iter().map(|i| i.v));
                            *d = (*d).max(depth);
                        }
                        _ => bail!("APPEND to a non-list"),
                    }
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = pop(&mut stack)?;
                        vec![pop(&mut stack)?, v]
                    } else {
                        pop_mark(&mut stack, &mut marks)?
                    };
                    if items.len() % 2 != 0 {
                        bail!("odd number of dict items");
                    }
                    let depth = deeper(&items)?;
                    let Some(Item { v: Value::Dict(d), depth: dd }) = stack.last_mut() else {
                        bail!("SETITEMS on a non-dict")
                    };
                    charge(d.len(), Rc::strong_count(d) > 1)?;
                    *dd = (*dd).max(depth);
                    let d = Rc::make_mut(d);
                    let mut it = items.into_iter().map(|i| i.v);
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                }
                b'Q' => {
                    let pid = pop(&mut stack)?;
                    stack.push(Item { v: persistent(&pid.v)?, depth: pid.depth });
                }
                b'R' => {
                    let args = pop(&mut stack)?;
                    let f = pop(&mut stack)?;
                    let (Value::Global(g), Value::Tuple(a)) = (&f.v, &args.v) else {
                        bail!("REDUCE of {}", kind(&f.v))
                    };
                    stack.push(Item { v: call(g, a)?, depth: args.depth });
                }
                0x81 => {
                    let _args = pop(&mut stack)?;
                    let cls = pop(&mut stack)?;
                    let Value::Global(g) = &cls.v else { bail!("NEWOBJ of {}", kind(&cls.v)) };
                    let Global::Class(name) = &**g else { bail!("NEWOBJ of {g:?}") };
                    stack
                        .push(Item { v: Value::Object { class: name.clone(), state: Rc::new(Value::None) }, depth: 1 });
                }
                b'b' => {
                    let new_state = pop(&mut stack)?;
                    let depth = deeper(std::slice::from_ref(&new_state))?;
                    match stack.last_mut() {
                        Some(Item { v: Value::Object { state, .. }, depth: d }) => {
                            *state = Rc::new(new_state.v);
                            *d = (*d).max(depth);
                        }
                        // A module's state_dict is an OrderedDict whose instance attributes
                        // (torch's `_metadata` of module versions) follow its items; they are not
                        // tensors, so they are dropped.
                        Some(Item { v: Value::Dict(_), .. }) => {}
                        Some(other) => bail!("BUILD of {}", kind(&other.v)),
                        None => bail!("stack underflow"),
                    }
                }
                b'.' => return Ok(true),
                other => bail!("unsupported pickle opcode 0x{other:02x}; only tensor state_dicts are read"),
            }
            Ok(false)
        })()
        .map_err(|e| anyhow!("{e} (pickle byte {at})"))?;
        if step {
            return stack.pop().map(|i| i.v).ok_or_else(|| anyhow!("empty pickle"));
        }
    }
    bail!("the pickle runs more than {MAX_OPS} opcodes; not a state_dict")
}

/// Everything a state_dict-like value holds, by dotted path: tensors and integer attributes
/// (TorchScript module fields such as `stride`, `padding`).
#[derive(Debug, Default)]
pub struct Entries {
    pub tensors: Vec<(String, Rc<TensorRef>)>,
    pub ints: Vec<(String, Vec<i64>)>,
}

/// Walk `v`, visiting at most `budget` nodes (shared sub-objects count every time they are reached,
/// so a file cannot make the walk exponential).
pub fn entries(v: &Value, budget: usize) -> Result<Entries> {
    let mut out = Entries::default();
    let mut left = budget;
    walk(v, "", &mut out, &mut left)?;
    Ok(out)
}

fn walk(v: &Value, path: &str, out: &mut Entries, left: &mut usize) -> Result<()> {
    // A long path costs more: the paths of shared sub-objects are built anew at every visit.
    let cost = 1 + path.len() / 16;
    *left = left.checked_sub(cost).ok_or_else(|| anyhow!("the pickle's object graph is too large"))?;
    let join = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
    match v {
        Value::Tensor(t) => out.tensors.push((path.to_string(), t.clone())),
        Value::Int(i) => out.ints.push((path.to_string(), vec![*i])),
        Value::List(items) | Value::Tuple(items) if items.iter().all(|x| matches!(x, Value::Int(_))) => {
            out.ints.push((path.to_string(), items.iter().map(|x| int(x).unwrap_or(0)).collect()))
        }
        Value::Dict(items) => {
            for (k, v) in items.iter() {
                if let Value::Str(k) = k {
                    walk(v, &join(k), out, left)?;
                }
            }
        }
        Value::Object { state, .. } => walk(state, path, out, left)?,
        _ => {}
    }
    Ok(())
}
