//! Data parallelism: where a process stands (rank, world, local rank) from torchrun's or SLURM's
//! environment, the communicator the training loop sums gradients and counts with (`Comm`: one process,
//! in-process threads for tests, NCCL on GPUs), the TCP rendezvous that hands NCCL's unique id from rank 0
//! to the others, the gradient buckets, and the supervisor behind `--nproc-per-node`.
//!
//! Every rank computes the same thing from the same numbers: gradients are summed (each rank's losses are
//! already divided by the global counts), so the gradient norm, the non-finite flag, the loss scale and
//! the update are identical everywhere without further agreement.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::bail;
use crate::error::{Error, Result};

/// This process's place in a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankInfo {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl RankInfo {
    /// From torchrun's (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM's (SLURM_PROCID, SLURM_NTASKS,
    /// SLURM_LOCALID) variables, with MASTER_ADDR and MASTER_PORT; None when neither is set.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<RankInfo>> {
        let num = |k: &str| -> Result<Option<usize>> {
            match get(k) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| Error::Invalid(format!("{k}={v:?} is not a number"))),
            }
        };
        let (rank, world, local) = match (num("RANK")?, num("WORLD_SIZE")?) {
            (Some(r), Some(w)) => (r, w, num("LOCAL_RANK")?.unwrap_or(r)),
            (None, None) => match (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
                (Some(r), Some(w)) => (r, w, num("SLURM_LOCALID")?.unwrap_or(0)),
                _ => return Ok(None),
            },
            _ => bail!("RANK and WORLD_SIZE must be set together (as torchrun does)"),
        };
        if world == 0 || rank >= world {
            bail!("rank {rank} is not below the world size {world}");
        }
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port = match get("MASTER_PORT") {
            Some(p) => p
                .trim()
                .parse()
                .map_err(|_| Error::Invalid(format!("MASTER_PORT={p:?} is not a port number")))?,
            None if world == 1 => 0,
            None => {
                bail!("MASTER_PORT is not set: the ranks of a job of {world} meet at MASTER_ADDR:MASTER_PORT")
            }
        };
        Ok(Some(RankInfo { rank, world, local_rank: local, master_addr, master_port }))
    }
}

/// Collectives over the ranks of a job, on host numbers (counts, losses, flags); the gradients go through
/// `Backend::all_reduce_sum`, on the device where the backend can.
pub trait Comm {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// data = Σ over ranks, in place.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()>;
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    fn as_any(&self) -> &dyn std::any::Any;
}

/// One process alone.
pub struct Single;

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Ranks as threads of one process: the stand-in for NCCL in tests. A rank that fails (or never comes)
/// makes the others fail with a message naming it, after `timeout` at the latest.
pub struct InProcess {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

struct State {
    arrived: usize,
    generation: u64,
    slots: Vec<Vec<f64>>,
    result: Vec<f64>,
    failed: Option<String>,
}

impl InProcess {
    /// The communicators of `world` ranks, one per thread.
    pub fn group(world: usize, timeout: Duration) -> Vec<InProcess> {
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(State {
                arrived: 0,
                generation: 0,
                slots: vec![Vec::new(); world],
                result: Vec::new(),
                failed: None,
            }),
            cv: Condvar::new(),
        });
        (0..world).map(|rank| InProcess { rank, shared: shared.clone() }).collect()
    }

    /// Tell the others this rank has failed: their next collective errors instead of waiting.
    pub fn fail(&self, why: &str) {
        let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        s.failed.get_or_insert_with(|| format!("rank {} failed: {why}", self.rank));
        self.shared.cv.notify_all();
    }

    /// Deposit `data`, wait for every rank, get the sum in rank order.
    fn exchange(&self, data: &[f64]) -> Result<Vec<f64>> {
        let sh = &self.shared;
        let mut s = sh.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = &s.failed {
            bail!("{f}; stopping rank {}", self.rank);
        }
        s.slots[self.rank] = data.to_vec();
        s.arrived += 1;
        let gen = s.generation;
        if s.arrived == sh.world {
            let n = data.len();
            if s.slots.iter().any(|v| v.len() != n) {
                s.failed = Some("ranks called a collective with different sizes".into());
            } else {
                let mut sum = vec![0f64; n];
                for v in &s.slots {
                    for (a, b) in sum.iter_mut().zip(v) {
                        *a += b;
                    }
                }
                s.result = sum;
            }
            s.arrived = 0;
            s.generation += 1;
            sh.cv.notify_all();
        } else {
            let deadline = Instant::now() + sh.timeout;
            while s.generation == gen && s.failed.is_none() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let msg = format!(
                        "rank {}: the other ranks did not reach the collective within {:?}",
                        self.rank, sh.timeout
                    );
                    s.failed = Some(msg.clone());
                    sh.cv.notify_all();
                    bail!("{msg}");
                }
                s = sh.cv.wait_timeout(s, left).unwrap_or_else(|p| p.into_inner()).0;
            }
        }
        if let Some(f) = &s.failed {
            bail!("{f}; stopping rank {}", self.rank);
        }
        Ok(s.result.clone())
    }
}

impl Comm for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        let sum = self.exchange(&data.iter().map(|&x| x as f64).collect::<Vec<_>>())?;
        for (d, s) in data.iter_mut().zip(sum) {
            *d = s as f32;
        }
        Ok(())
    }
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()> {
        let sum = self.exchange(data)?;
        data.copy_from_slice(&sum);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.exchange(&[]).map(|_| ())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The length of NCCL's unique id.
pub const ID_BYTES: usize = 128;
const HELLO: &str = "BERTCUDA-RDV1";

/// Rank 0 serves `id` at addr:port until every other rank of `world` has it; the others connect (with
/// retries) and receive it. A wrong world size, a duplicate or out-of-range rank, a port in use, or a
/// rank that does not come within `timeout` is an error naming the cause — never a hang.
pub fn rendezvous(info: &RankInfo, id: Option<[u8; ID_BYTES]>, timeout: Duration) -> Result<[u8; ID_BYTES]> {
    let deadline = Instant::now() + timeout;
    let addr = format!("{}:{}", info.master_addr, info.master_port);
    if info.rank == 0 {
        let id = id.ok_or_else(|| Error::Invalid("internal: rank 0 needs the id to serve".into()))?;
        let listener = TcpListener::bind(&addr).map_err(|e| {
            Error::Invalid(format!(
                "rank 0 cannot listen on {addr} ({e}); is the port in use? Choose another MASTER_PORT"
            ))
        })?;
        listener.set_nonblocking(true).map_err(|e| Error::Invalid(e.to_string()))?;
        let mut seen = vec![false; info.world];
        seen[0] = true;
        let mut waiting: Vec<TcpStream> = Vec::new();
        while seen.iter().any(|s| !s) {
            if Instant::now() >= deadline {
                let missing: Vec<usize> = (0..info.world).filter(|&r| !seen[r]).collect();
                bail!(
                    "rendezvous at {addr}: ranks {missing:?} of {} did not arrive within {timeout:?}",
                    info.world
                );
            }
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).ok();
                    // A greeting is one short line; read at most 64 bytes, never past the deadline.
                    let left =
                        deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
                    s.set_read_timeout(Some(left.min(Duration::from_secs(10)))).ok();
                    let mut line = String::new();
                    BufReader::new((&mut s).take(64)).read_line(&mut line).ok();
                    let parts: Vec<&str> = line.split_whitespace().collect();
                    let parsed = match parts.as_slice() {
                        [h, r, w] if *h == HELLO => r.parse::<usize>().ok().zip(w.parse::<usize>().ok()),
                        _ => None,
                    };
                    let refuse = |s: &mut TcpStream, why: String| -> Result<()> {
                        let _ = writeln!(s, "ERR {why}");
                        bail!("rendezvous at {addr}: {why}")
                    };
                    match parsed {
                        None => continue, // not one of ours
                        Some((_, w)) if w != info.world => refuse(
                            &mut s,
                            format!("a rank was started with world size {w}, rank 0 with {}", info.world),
                        )?,
                        Some((r, _)) if r == 0 || r >= info.world => {
                            refuse(&mut s, format!("rank {r} is out of range for world size {}", info.world))?
                        }
                        Some((r, _)) if seen[r] => refuse(&mut s, format!("rank {r} arrived twice"))?,
                        Some((r, _)) => {
                            seen[r] = true;
                            waiting.push(s);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => bail!("rendezvous at {addr}: {e}"),
            }
        }
        for mut s in waiting {
            s.write_all(b"OK ")
                .and_then(|_| s.write_all(&id))
                .map_err(|e| Error::Invalid(format!("rendezvous: {e}")))?;
        }
        return Ok(id);
    }
    loop {
        let sock = addr.to_socket_addrs().ok().and_then(|mut a| a.next());
        let attempt = sock.and_then(|sa| TcpStream::connect_timeout(&sa, Duration::from_millis(500)).ok());
        if let Some(mut s) = attempt {
            // The hello in one write; a peer that answers and closes before reading all of it (a foreign
            // service) may fail the write, so its answer is read before the write's error counts.
            let wrote = s.write_all(format!("{HELLO} {} {}\n", info.rank, info.world).as_bytes());
            s.set_read_timeout(Some(
                deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)),
            ))
            .ok();
            let mut head = [0u8; 3];
            if s.read_exact(&mut head).is_err() {
                if let Err(e) = wrote {
                    bail!("rank {}: rendezvous with {addr}: {e}", info.rank);
                }
                bail!("rank {}: rank 0 at {addr} did not send the id within {timeout:?} (another rank missing?)", info.rank);
            }
            if &head == b"ERR" {
                let mut why = String::new();
                let _ = s.take(1024).read_to_string(&mut why);
                bail!("rank {}: rank 0 refused: {}", info.rank, why.trim());
            }
            if &head != b"OK " {
                bail!(
                    "rank {}: {addr} is not a bertcuda rendezvous (it answered {:?})",
                    info.rank,
                    String::from_utf8_lossy(&head)
                );
            }
            let mut id = [0u8; ID_BYTES];
            s.read_exact(&mut id)
                .map_err(|e| Error::Invalid(format!("rank {}: rendezvous: {e}", info.rank)))?;
            return Ok(id);
        }
        if Instant::now() >= deadline {
            bail!("rank {}: no rank 0 at {addr} within {timeout:?}", info.rank);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Gradient buckets: ranges of the flat gradient buffer of about `cap` floats, in the order backward
/// finishes them (the parameter table backwards), each with the number of encoder layers whose backward
/// must be done before it is complete (`layers` = after the whole backward).
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    pub start: usize,
    pub len: usize,
    /// Ready once backward has finished layer `ready_after_layer` (counting down from the last); None:
    /// only at the end of backward (embeddings, and the word embeddings tied to the MLM decoder).
    pub ready_after_layer: Option<usize>,
}

pub fn buckets(table: &crate::model::params::ParamTable, cap: usize) -> Vec<Bucket> {
    // A parameter's layer: Some(l) for encoder layer l, None for the rest (heads finish first, embeddings
    // last; the heads are grouped with the last layer, whose backward comes right after them).
    let layer_of = |name: &str| -> Option<usize> {
        name.strip_prefix("bert.encoder.layer.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse().ok())
    };
    let last = table.layers.len().saturating_sub(1);
    let mut out: Vec<Bucket> = Vec::new();
    for p in table.params.iter().rev() {
        let ready = if p.name.starts_with("bert.embeddings.") {
            None
        } else if p.name.starts_with("bert.encoder.") {
            layer_of(&p.name)
        } else {
            Some(last)
        };
        match out.last_mut() {
            // Extend the open bucket when this parameter is adjacent, fits, and is ready no later.
            Some(b) if b.start == p.offset + p.len && b.len + p.len <= cap => {
                b.start = p.offset;
                b.len += p.len;
                b.ready_after_layer = match (b.ready_after_layer, ready) {
                    (Some(a), Some(r)) => Some(a.min(r)),
                    _ => None,
                };
            }
            _ => out.push(Bucket { start: p.offset, len: p.len, ready_after_layer: ready }),
        }
    }
    out
}

/// `--nproc-per-node N`: start N ranks of this command on this node and watch them. Their output lines
/// are prefixed by rank; when one exits with an error the others are stopped and the error names it.
pub fn supervise(exe: &std::path::Path, args: &[String], n: usize, port: u16) -> Result<()> {
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};
    // SIGINT/SIGTERM to the supervisor go to every rank (each saves and exits as one process would).
    let pending = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let p = pending.clone();
        // SAFETY: the handler only stores to an atomic.
        unsafe { signal_hook::low_level::register(sig, move || p.store(sig as usize, Ordering::SeqCst)) }
            .map_err(|e| Error::Invalid(format!("cannot install signal handlers: {e}")))?;
    }
    let mut readers: Vec<Vec<std::thread::JoinHandle<()>>> = Vec::new();
    let mut children = Vec::new();
    for rank in 0..n {
        let mut c = Command::new(exe);
        c.args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().map_err(|e| Error::Invalid(format!("cannot start rank {rank}: {e}")))?;
        let mut mine = Vec::new();
        for (stream, is_err) in [
            (child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>), false),
            (child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>), true),
        ] {
            if let Some(s) = stream {
                mine.push(std::thread::spawn(move || {
                    for line in BufReader::new(s).lines().map_while(|l| l.ok()) {
                        if is_err {
                            eprintln!("[rank {rank}] {line}");
                        } else {
                            println!("[rank {rank}] {line}");
                        }
                    }
                }));
            }
        }
        readers.push(mine);
        children.push(child);
    }
    let mut done = vec![false; n];
    loop {
        let sig = pending.swap(0, Ordering::SeqCst);
        if sig != 0 {
            for (r, c) in children.iter().enumerate() {
                if !done[r] {
                    // SAFETY: sending a signal to our own child process.
                    unsafe { libc::kill(c.id() as libc::pid_t, sig as libc::c_int) };
                }
            }
        }
        for rank in 0..n {
            if done[rank] {
                continue;
            }
            if let Some(status) = children[rank].try_wait().map_err(|e| Error::Invalid(e.to_string()))? {
                done[rank] = true;
                // Its last lines (its error) are printed before anything else is said.
                for h in readers[rank].drain(..) {
                    let _ = h.join();
                }
                if !status.success() {
                    for (r, c) in children.iter_mut().enumerate() {
                        if !done[r] {
                            let _ = c.kill();
                            let _ = c.wait();
                        }
                    }
                    bail!("rank {rank} exited with {status}; the other ranks were stopped. Resume from the last checkpoint with --resume auto");
                }
            }
        }
        if done.iter().all(|d| *d) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free TCP port on the loopback interface, for a rendezvous on this node.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::Invalid(format!("no free port: {e}")))?;
    Ok(l.local_addr().map_err(|e| Error::Invalid(e.to_string()))?.port())
}
