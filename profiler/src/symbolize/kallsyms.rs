//! Kernel function names from /proc/kallsyms, read once (30 ms of system
//! time here) into a [`Table`]: addresses sorted, every name in one
//! string, 4 MB for this kernel's 121 K functions, where blazesym's
//! table (a `String` and an entry per symbol) took 6 MB. Reading it twice
//! to keep only the names asked for would take 1 MB, for 30 ms more of a
//! capture's stop.

use std::io::{BufRead, BufReader};

const PATH: &str = "/proc/kallsyms";

/// Functions (text symbols, weak ones included).
fn is_function(ty: u8) -> bool {
    matches!(ty, b't' | b'T' | b'w' | b'W')
}

/// Calls `f(address, name)` for each function of `text` (kallsyms'
/// format: `ffffffff81000000 T _stext` and `... t name\t[module]`).
fn each_function(mut text: impl BufRead, mut f: impl FnMut(u64, &str)) -> std::io::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if text.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut it = line.split_ascii_whitespace();
        let (Some(addr), Some(ty), Some(name)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        if addr != 0 && ty.len() == 1 && is_function(ty.as_bytes()[0]) {
            f(addr, name);
        }
    }
}

fn open() -> std::io::Result<impl BufRead> {
    Ok(BufReader::with_capacity(
        64 * 1024,
        std::fs::File::open(PATH)?,
    ))
}

/// Every kernel function, kept: addresses sorted, names in one string.
pub struct Table {
    starts: Vec<u64>,
    /// Each function's name in `names`, in the order of `starts`.
    spans: Vec<(u32, u32)>,
    names: String,
}

impl Table {
    /// Reads kallsyms; None when no function address can be read.
    pub fn load() -> Option<Table> {
        Self::from(open().ok()?)
    }

    fn from(text: impl BufRead) -> Option<Table> {
        let mut entries: Vec<(u64, (u32, u32))> = Vec::new();
        let mut names = String::new();
        each_function(text, |a, name| {
            let start = names.len() as u32;
            names.push_str(name);
            entries.push((a, (start, names.len() as u32)));
        })
        .ok()?;
        if entries.is_empty() {
            return None;
        }
        // Several names at one address: the first listed.
        entries.sort_by_key(|e| e.0);
        entries.dedup_by_key(|e| e.0);
        let (starts, spans) = entries.into_iter().unzip();
        Some(Table {
            starts,
            spans,
            names,
        })
    }

    /// Where function `name` starts (the first listed of that name).
    #[cfg(test)]
    pub fn address_of(&self, name: &str) -> Option<u64> {
        let i = self
            .spans
            .iter()
            .position(|&(s, e)| &self.names[s as usize..e as usize] == name)?;
        Some(self.starts[i])
    }

    /// The name of the function `addr` is in.
    pub fn name(&self, addr: u64) -> Option<&str> {
        let i = self.starts.partition_point(|&s| s <= addr);
        if i == 0 {
            return None;
        }
        let (start, end) = self.spans[i - 1];
        Some(&self.names[start as usize..end as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "ffffffff81000000 T _stext\n\
        ffffffff81000000 T _text\n\
        ffffffff81001000 t do_one\n\
        ffffffff81002000 D some_data\n\
        ffffffff81003000 W weak_fn\n\
        ffffffffc0001000 t mod_fn\t[mymod]\n\
        ffffffff81002800 T late_listed\n\
        garbage line\n";

    #[test]
    fn functions_are_named_by_the_nearest_start_below() {
        let table = Table::from(TEXT.as_bytes()).unwrap();
        for (a, w) in [
            (0xffffffff81000010, Some("_stext")),
            (0xffffffff81001fff, Some("do_one")),
            (0xffffffff81002900, Some("late_listed")),
            (0xffffffff81003005, Some("weak_fn")),
            (0xffffffffc0001234, Some("mod_fn")),
            (0xffffffff80000000, None),
        ] {
            assert_eq!(table.name(a), w, "{a:x}");
        }
    }

    #[test]
    fn hidden_addresses_give_nothing() {
        let hidden = "0000000000000000 T _stext\n0000000000000000 t do_one\n";
        assert!(Table::from(hidden.as_bytes()).is_none());
    }

    #[test]
    fn this_kernel_names_its_scheduler() {
        // Unprivileged, kallsyms shows zeros: nothing to check then.
        let Some(table) = Table::load() else { return };
        let at = table.address_of("schedule").expect("schedule in kallsyms");
        assert_eq!(table.name(at + 1), Some("schedule"));
    }
}
