//! A safe reader of the Python pickles that `torch.save` writes for state dicts.
//!
//! Unpickling in Python runs whatever callable the file names (`os.system`, `builtins.eval`, ...). This
//! reader is an interpreter of the opcodes a state dict uses that never calls anything: the only callables
//! it accepts are the handful a state dict needs, and those it understands itself —
//! `collections.OrderedDict` (an empty dict), `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor` /
//! `_rebuild_parameter` (a view of a storage: offset, shape, strides) and torch's storage types (as the
//! element type of a persistent storage reference). A `GLOBAL` naming anything else is refused with its
//! name, at the point it appears, before any later opcode is read.
//!
//! Python objects are shared references: lists and dicts are `Rc<RefCell<..>>`, so the memo gives back the
//! same object (a pickle cannot blow up memory by fetching a big list many times: each fetch is a pointer).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// An element type of a torch storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    F64,
    F16,
    Bf16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageDtype {
    fn from_storage_type(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::F32,
            "DoubleStorage" => Self::F64,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::Bf16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::Bf16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F64 => "float64",
            Self::F16 => "float16",
            Self::Bf16 => "bfloat16",
            Self::I64 => "int64",
            Self::I32 => "int32",
            Self::I16 => "int16",
            Self::I8 => "int8",
            Self::U8 => "uint8",
            Self::Bool => "bool",
        }
    }
}

/// A persistent reference to a storage: resolved by the container (zip entry or legacy record).
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    pub dtype: StorageDtype,
    pub key: String,
    /// Elements, as the reference states it.
    pub numel: usize,
}

/// A tensor: a strided view of a storage (all in elements).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: Rc<StorageRef>,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
}

/// The callables this reader accepts (never called: each is understood by the reader itself).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Callable {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    StorageType(StorageDtype),
}

/// The items of a tuple, list or set. Dropped without recursion: a pickle nesting a million tuples (one
/// opcode each) must not overflow the stack when its value is freed.
#[derive(Debug, Default)]
pub struct Items(pub Vec<Value>);

/// The entries of a dict, in insertion order (a repeated key: the last one counts, see `dict_entries`).
#[derive(Debug, Default)]
pub struct Pairs(pub Vec<(Value, Value)>);

impl std::ops::Deref for Items {
    type Target = Vec<Value>;
    fn deref(&self) -> &Vec<Value> {
        &self.0
    }
}
impl std::ops::DerefMut for Items {
    fn deref_mut(&mut self) -> &mut Vec<Value> {
        &mut self.0
    }
}
impl std::ops::Deref for Pairs {
    type Target = Vec<(Value, Value)>;
    fn deref(&self) -> &Vec<(Value, Value)> {
        &self.0
    }
}
impl std::ops::DerefMut for Pairs {
    fn deref_mut(&mut self) -> &mut Vec<(Value, Value)> {
        &mut self.0
    }
}

/// Free nested containers with a work list instead of recursion (only those this was the last owner of:
/// a shared or cyclic one is left to its other owners).
fn dismantle(mut work: Vec<Value>) {
    while let Some(v) = work.pop() {
        match v {
            Value::Tuple(rc) => {
                if let Ok(mut items) = Rc::try_unwrap(rc) {
                    work.append(&mut items.0);
                }
            }
            Value::List(rc) | Value::Set(rc) => {
                if let Ok(cell) = Rc::try_unwrap(rc) {
                    let mut items = cell.into_inner();
                    work.append(&mut items.0);
                }
            }
            Value::Dict(rc) => {
                if let Ok(cell) = Rc::try_unwrap(rc) {
                    let mut pairs = cell.into_inner();
                    work.extend(std::mem::take(&mut pairs.0).into_iter().flat_map(|(k, v)| [k, v]));
                }
            }
            _ => {}
        }
    }
}

impl Drop for Items {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            dismantle(std::mem::take(&mut self.0));
        }
    }
}

impl Drop for Pairs {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            dismantle(std::mem::take(&mut self.0).into_iter().flat_map(|(k, v)| [k, v]).collect());
        }
    }
}

#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits, as its little-endian two's-complement bytes (torch's magic number).
    BigInt(Rc<[u8]>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Items>),
    List(Rc<RefCell<Items>>),
    Dict(Rc<RefCell<Pairs>>),
    Set(Rc<RefCell<Items>>),
    Callable(Callable),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    /// What it is, in a word (for messages: a value may contain itself, so it is never printed whole).
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) | Value::BigInt(_) => "an int",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Set(_) => "a set",
            Value::Callable(_) => "a callable",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The entries of a dict in insertion order, a repeated key holding its last value as in Python
    /// (keys as text: strings and ints; others shown as their kind).
    pub fn dict_entries(&self) -> Option<Vec<(String, Value)>> {
        let Value::Dict(d) = self else { return None };
        let mut out: Vec<(String, Value)> = Vec::new();
        let mut at: HashMap<String, usize> = HashMap::new();
        for (k, v) in d.borrow().iter() {
            let key = match k {
                Value::Str(s) => s.to_string(),
                Value::Int(i) => i.to_string(),
                other => format!("<{}>", other.kind()),
            };
            match at.get(&key) {
                Some(&i) => out[i].1 = v.clone(),
                None => {
                    at.insert(key.clone(), out.len());
                    out.push((key, v.clone()));
                }
            }
        }
        Some(out)
    }

    fn usize(&self, what: &str) -> Result<usize, String> {
        match self {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            other => Err(format!("{what} is {}, expected a non-negative int", other.kind())),
        }
    }

    fn usizes(&self, what: &str) -> Result<Vec<usize>, String> {
        match self {
            Value::Tuple(t) => t.iter().map(|v| v.usize(what)).collect(),
            Value::List(l) => l.borrow().iter().map(|v| v.usize(what)).collect(),
            other => Err(format!("{what} is {}, expected a tuple of ints", other.kind())),
        }
    }
}

/// The accepted callables by their pickled names (`module name`).
fn allowed(module: &str, name: &str) -> Option<Callable> {
    match (module, name) {
        ("collections", "OrderedDict") => Some(Callable::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Callable::RebuildTensorV2),
        ("torch._utils", "_rebuild_tensor") => Some(Callable::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") => Some(Callable::RebuildParameter),
        ("torch", n) => StorageDtype::from_storage_type(n).map(Callable::StorageType),
        _ => None,
    }
}

/// Read one pickle from the start of `data`. Returns the value and the number of bytes it took.
/// Errors are a sentence (the caller names the file).
pub fn load(data: &[u8]) -> Result<(Value, usize), String> {
    Machine { data, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() }.run()
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    /// Sparse: a pickle naming memo slot 4,000,000,000 costs one entry, not a table that long.
    memo: HashMap<usize, Value>,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| {
            format!("the pickle ends in the middle of an opcode at byte {} (truncated file?)", self.pos)
        })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn sized(&mut self, n: u64) -> Result<&'a [u8], String> {
        let n = usize::try_from(n).map_err(|_| format!("a length of {n} bytes at byte {}", self.pos))?;
        self.take(n)
    }
    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or("the pickle ends inside a text opcode")?;
        let s =
            std::str::from_utf8(&rest[..n]).map_err(|_| "a text opcode is not valid UTF-8".to_string())?;
        self.pos += n + 1;
        Ok(s)
    }
    fn utf8(bytes: &[u8]) -> Result<Value, String> {
        std::str::from_utf8(bytes)
            .map(|s| Value::Str(s.into()))
            .map_err(|_| "a string in the pickle is not valid UTF-8".to_string())
    }

    fn pop(&mut self) -> Result<Value, String> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("the pickle pops past a MARK (malformed)".into());
        }
        self.stack.pop().ok_or_else(|| "the pickle pops an empty stack (malformed)".into())
    }
    fn top(&mut self) -> Result<&mut Value, String> {
        self.stack.last_mut().ok_or_else(|| "the pickle uses an empty stack (malformed)".into())
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let m = self.marks.pop().ok_or("the pickle has no MARK where one is needed (malformed)")?;
        Ok(self.stack.split_off(m))
    }
    fn put(&mut self, i: usize) -> Result<(), String> {
        let v = self.top()?.clone();
        self.memo.insert(i, v);
        Ok(())
    }
    fn get(&mut self, i: usize) -> Result<(), String> {
        let v = self.memo.get(&i).cloned().ok_or_else(|| format!("memo entry {i} was never stored"))?;
        self.stack.push(v);
        Ok(())
    }

    /// Execute opcodes to STOP. One match over the opcodes, like CPython's own load loop: each arm is a
    /// few lines against the machine's stack, memo and marks, and splitting them would only pass that
    /// state around (hence its length).
    fn run(mut self) -> Result<(Value, usize), String> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(format!("pickle protocol {proto} is newer than any this reader knows (5)"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok((v, self.pos));
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                // Constants and numbers.
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64))
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64))
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.u8()? as u64 } else { self.u32()? as u64 };
                    let bytes = self.sized(n)?;
                    self.stack.push(long(bytes)?);
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v))
                }
                b'I' => {
                    let line = self.line()?;
                    let v = match line {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        s => Value::Int(s.trim().parse().map_err(|_| format!("INT {s:?} is not an integer"))?),
                    };
                    self.stack.push(v);
                }
                b'L' => {
                    let line = self.line()?;
                    let s = line.trim().trim_end_matches('L');
                    let v = s.parse().map_err(|_| format!("LONG {s:?} does not fit 64 bits"))?;
                    self.stack.push(Value::Int(v));
                }
                b'F' => {
                    let line = self.line()?;
                    let v = line.trim().parse().map_err(|_| format!("FLOAT {line:?} is not a number"))?;
                    self.stack.push(Value::Float(v));
                }
                // Strings and bytes.
                b'X' => {
                    let n = self.u32()? as u64;
                    let b = self.sized(n)?;
                    self.stack.push(Self::utf8(b)?);
                }
                0x8c => {
                    let n = self.u8()? as u64;
                    let b = self.sized(n)?;
                    self.stack.push(Self::utf8(b)?);
                }
                0x8d => {
                    let n = self.u64()?;
                    let b = self.sized(n)?;
                    self.stack.push(Self::utf8(b)?);
                }
                b'V' => {
                    let line = self.line()?;
                    self.stack.push(Value::Str(line.into()));
                }
                b'U' | b'T' => {
                    // Python 2 str: bytes, read as text when they are UTF-8.
                    let n = if op == b'U' { self.u8()? as u64 } else { self.u32()? as u64 };
                    let b = self.sized(n)?;
                    self.stack.push(Self::utf8(b).unwrap_or_else(|_| Value::Bytes(b.into())));
                }
                b'S' => {
                    let line = self.line()?;
                    let s = line.trim();
                    let inner = s
                        .strip_prefix('\'')
                        .and_then(|s| s.strip_suffix('\''))
                        .or_else(|| s.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
                        .ok_or_else(|| format!("STRING {s:?} is not quoted"))?;
                    self.stack.push(Value::Str(inner.into()));
                }
                b'C' | b'B' | 0x8e | 0x96 => {
                    let n = match op {
                        b'C' => self.u8()? as u64,
                        b'B' => self.u32()? as u64,
                        _ => self.u64()?,
                    };
                    let b = self.sized(n)?;
                    self.stack.push(Value::Bytes(b.into()));
                }
                // Containers.
                b')' => self.stack.push(Value::Tuple(Rc::new(Items::default()))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(Items(items))));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n + self.marks.last().copied().unwrap_or(0) {
                        return Err("a TUPLE opcode finds too few items (malformed)".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(Rc::new(Items(items))));
                }
                b']' => self.stack.push(Value::List(Rc::new(RefCell::new(Items::default())))),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(Items(items)))));
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().push(v),
                        other => return Err(format!("APPEND to {}, not a list", other.kind())),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().extend(items),
                        other => return Err(format!("APPENDS to {}, not a list", other.kind())),
                    }
                }
                b'}' => self.stack.push(Value::Dict(Rc::new(RefCell::new(Pairs::default())))),
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = pairs(items)?;
                    self.stack.push(Value::Dict(Rc::new(RefCell::new(Pairs(d)))));
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    set_items(self.top()?, vec![(k, v)])?;
                }
                b'u' => {
                    let items = pairs(self.pop_mark()?)?;
                    set_items(self.top()?, items)?;
                }
                0x8f => self.stack.push(Value::Set(Rc::new(RefCell::new(Items::default())))),
                0x90 => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::Set(s) => s.borrow_mut().extend(items),
                        other => return Err(format!("ADDITEMS to {}, not a set", other.kind())),
                    }
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Set(Rc::new(RefCell::new(Items(items)))));
                }
                // The memo.
                b'q' => {
                    let i = self.u8()? as usize;
                    self.put(i)?
                }
                b'r' => {
                    let i = self.u32()? as usize;
                    self.put(i)?
                }
                b'p' => {
                    let line = self.line()?;
                    let i = line.trim().parse().map_err(|_| format!("PUT {line:?}"))?;
                    self.put(i)?
                }
                0x94 => {
                    let i = self.memo.len();
                    self.put(i)?
                }
                b'h' => {
                    let i = self.u8()? as usize;
                    self.get(i)?
                }
                b'j' => {
                    let i = self.u32()? as usize;
                    self.get(i)?
                }
                b'g' => {
                    let line = self.line()?;
                    let i = line.trim().parse().map_err(|_| format!("GET {line:?}"))?;
                    self.get(i)?
                }
                // Names of callables: only the allowed ones.
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Callable(global(module, name)?));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module.as_str(), name.as_str()) {
                        (Some(m), Some(n)) => {
                            let c = global(m, n)?;
                            self.stack.push(Value::Callable(c));
                        }
                        _ => return Err("STACK_GLOBAL with names that are not strings".into()),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = reduce(f, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: attributes set on the object below (a state dict's `_metadata`); not needed.
                    self.pop()?;
                    self.top()?;
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    match cls {
                        Value::Callable(Callable::OrderedDict) => {
                            let _ = args;
                            self.stack.push(Value::Dict(Rc::new(RefCell::new(Pairs::default()))));
                        }
                        other => return Err(format!("NEWOBJ of {}, which a state dict never needs", other.kind())),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(persistent(pid)?);
                }
                b'P' => {
                    let line = self.line()?;
                    return Err(format!("a text persistent id {line:?}, which torch.save never writes"));
                }
                b'i' | b'o' | 0x92 => {
                    return Err(format!(
                        "opcode {} at byte {at} instantiates a class; a state dict never needs that, and bertcuda \
                         builds no object a file asks for",
                        op_name(op)
                    ))
                }
                0x82..=0x84 => return Err(format!("opcode {} (the copyreg extension registry) at byte {at}", op_name(op))),
                0x97 | 0x98 => return Err("out-of-band buffers (pickle protocol 5), which torch.save never writes".into()),
                other => return Err(format!("unknown pickle opcode 0x{other:02x} at byte {at} (corrupt file?)")),
            }
        }
    }
}

fn op_name(op: u8) -> &'static str {
    match op {
        b'i' => "INST",
        b'o' => "OBJ",
        0x92 => "NEWOBJ_EX",
        0x82 => "EXT1",
        0x83 => "EXT2",
        _ => "EXT4",
    }
}

fn global(module: &str, name: &str) -> Result<Callable, String> {
    allowed(module, name).ok_or_else(|| {
        format!(
            "the pickle names the callable {module}.{name}, which a state dict never needs; refused (bertcuda \
             reads tensors and calls nothing a file names — unpickled by Python, this file would call it)"
        )
    })
}

fn long(bytes: &[u8]) -> Result<Value, String> {
    if bytes.len() > 8 {
        return Ok(Value::BigInt(bytes.into()));
    }
    if bytes.is_empty() {
        return Ok(Value::Int(0));
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut b = [if negative { 0xff } else { 0 }; 8];
    b[..bytes.len()].copy_from_slice(bytes);
    Ok(Value::Int(i64::from_le_bytes(b)))
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>, String> {
    if items.len() % 2 != 0 {
        return Err("a dict opcode with an odd number of items (malformed)".into());
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn set_items(target: &mut Value, items: Vec<(Value, Value)>) -> Result<(), String> {
    match target {
        // Appended; a repeated key's last value counts (`Value::dict_entries`), as in Python.
        Value::Dict(d) => {
            d.borrow_mut().extend(items);
            Ok(())
        }
        other => Err(format!("SETITEM on {}, not a dict", other.kind())),
    }
}

fn args_of(args: &Value) -> Result<Vec<Value>, String> {
    match args {
        Value::Tuple(t) => Ok(t.to_vec()),
        other => Err(format!("REDUCE with arguments that are {}, not a tuple", other.kind())),
    }
}

/// REDUCE: the allowed callables, understood here (nothing is called).
fn reduce(f: Value, args: Value) -> Result<Value, String> {
    let args = args_of(&args)?;
    match f {
        Value::Callable(Callable::OrderedDict) => {
            let items = match args.first() {
                None => Vec::new(),
                Some(Value::List(l)) => l
                    .borrow()
                    .iter()
                    .map(|p| match p {
                        Value::Tuple(t) if t.len() == 2 => Ok((t[0].clone(), t[1].clone())),
                        _ => Err("OrderedDict built from something other than pairs".to_string()),
                    })
                    .collect::<Result<_, _>>()?,
                Some(other) => return Err(format!("OrderedDict built from {}", other.kind())),
            };
            Ok(Value::Dict(Rc::new(RefCell::new(Pairs(items)))))
        }
        Value::Callable(Callable::RebuildTensorV2 | Callable::RebuildTensor) => {
            if args.len() < 4 {
                return Err(format!("_rebuild_tensor with {} arguments, expected at least 4", args.len()));
            }
            let storage = match &args[0] {
                Value::Storage(s) => s.clone(),
                other => return Err(format!("a tensor rebuilt from {}, not a storage", other.kind())),
            };
            let offset = args[1].usize("the storage offset")?;
            let shape = args[2].usizes("the tensor's size")?;
            let strides = args[3].usizes("the tensor's stride")?;
            if shape.len() != strides.len() {
                return Err(format!("a tensor of size {shape:?} with strides {strides:?}"));
            }
            Ok(Value::Tensor(Rc::new(TensorRef { storage, offset, shape, strides })))
        }
        Value::Callable(Callable::RebuildParameter) => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err("_rebuild_parameter of something other than a tensor".into()),
        },
        Value::Callable(Callable::StorageType(_)) => {
            Err("a storage type called directly, which torch.save never writes".into())
        }
        other => Err(format!("REDUCE calls {}, which is not callable", other.kind())),
    }
}

/// BINPERSID: torch's `('storage', storage_type, key, location, numel[, view_metadata])`.
fn persistent(pid: Value) -> Result<Value, String> {
    let Value::Tuple(t) = &pid else {
        return Err(format!("a persistent id that is {}, expected torch's storage tuple", pid.kind()));
    };
    if t.len() < 5 || t[0].as_str() != Some("storage") {
        return Err("a persistent id that is not torch's ('storage', type, key, location, size)".into());
    }
    let Value::Callable(Callable::StorageType(dtype)) = t[1] else {
        return Err(format!("a storage reference whose type is {}", t[1].kind()));
    };
    let key = match &t[2] {
        Value::Str(s) => s.to_string(),
        Value::Int(i) => i.to_string(),
        other => return Err(format!("a storage key that is {}", other.kind())),
    };
    let numel = t[4].usize("a storage's size")?;
    if t.len() > 5 && !matches!(t[5], Value::None) {
        return Err(
            "a storage view (view_metadata, written by torch before 1.0), which this reader does not follow"
                .into(),
        );
    }
    Ok(Value::Storage(Rc::new(StorageRef { dtype, key, numel })))
}

#[cfg(test)]
#[path = "pickle_tests.rs"]
mod tests;
