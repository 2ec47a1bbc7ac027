//! The real [`PageTable`]: the region's pages as userfaultfd and the
//! kernel hold them.

use lego_sys::mm;
use lego_sys::uffd::Uffd;

use crate::pager::{PageTable, TableError};

/// The region's page table, reached through the runtime's userfaultfd.
pub struct UffdTable<'a> {
    pub uffd: &'a Uffd,
    /// This process's pidfd, for dropping many ranges in one call.
    pub pidfd: i32,
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> TableError {
    move |source| TableError::Os { what, source }
}

impl PageTable for UffdTable<'_> {
    fn copy_in(&mut self, addr: usize, src: &[u8], wp: bool) -> Result<usize, TableError> {
        match self.uffd.copy(addr, src, wp) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Err(TableError::Gone),
            r => r.map_err(os("UFFDIO_COPY")),
        }
    }

    fn write_protect(&mut self, addr: usize, len: usize, on: bool) -> Result<(), TableError> {
        self.uffd
            .write_protect(addr, len, on)
            .map_err(os("UFFDIO_WRITEPROTECT"))
    }

    fn wake(&mut self, addr: usize, len: usize) {
        // A wake can only fail for a range with no waiter, which is fine.
        let _ = self.uffd.wake(addr, len);
    }

    fn copy_out(&mut self, addr: usize, dst: &mut [u8]) {
        // SAFETY: the pager copies out only pages it holds resident and has
        // write-protected: no writer changes them during the copy, and only
        // the pager (under its lock) drops region pages.
        unsafe { mm::copy_page_out(addr, dst) };
    }

    fn drop_pages(&mut self, ranges: &[(usize, usize)]) -> Result<(), TableError> {
        mm::drop_pages(ranges, self.pidfd).map_err(os("MADV_DONTNEED"))
    }
}
