//! The "newc" cpio writer the initramfs is built with.

use std::collections::HashSet;

use anyhow::{bail, Context as _, Result};

/// A cpio archive in the "newc" format, the one the kernel unpacks as an initramfs.
#[derive(Default)]
pub(super) struct Cpio {
    buf: Vec<u8>,
    ino: u32,
    seen: HashSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> Result<()> {
        if !self.seen.insert(name.to_string()) {
            bail!("{name} is in the initramfs twice");
        }
        if let Some((parent, _)) = name.rsplit_once('/') {
            self.dir(parent)?;
        }
        let size = u32::try_from(data.len()).context("a file over 4 GiB")?;
        self.ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.buf.extend_from_slice(header.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub(super) fn dir(&mut self, name: &str) -> Result<()> {
        if self.seen.contains(name) {
            return Ok(());
        }
        self.entry(name, 0o040755, (0, 0), &[])
    }

    pub(super) fn file(&mut self, name: &str, data: &[u8], perm: u32) -> Result<()> {
        self.entry(name, 0o100000 | perm, (0, 0), data)
    }

    pub(super) fn symlink(&mut self, name: &str, target: &str) -> Result<()> {
        self.entry(name, 0o120777, (0, 0), target.as_bytes())
    }

    pub(super) fn node(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> Result<()> {
        self.entry(name, mode, (major, minor), &[])
    }

    pub(super) fn finish(mut self) -> Vec<u8> {
        let _ = self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut c = Cpio::default();
        c.file("pw/a", b"hello", 0o644).unwrap();
        c.symlink("bin/sh", "busybox").unwrap();
        let b = c.finish();
        assert!(b.starts_with(b"070701"));
        assert_eq!(b.len() % 4, 0);
        // The parent directory comes first, then the file.
        assert_eq!(&b[110..113], b"pw\0");
        assert!(b.windows(11).any(|w| w == b"TRAILER!!!\0"));
    }
}
