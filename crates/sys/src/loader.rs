//! What the dynamic loader knows about the loaded objects: here, where the
//! C library's and the loader's own code lie, so that the runtime can tell
//! an allocation glibc makes for itself from one the program makes.

use std::ffi::c_void;

/// The executable address ranges `[start, end)` of the C library and of
/// the dynamic loader (`ld.so`) in this process.
pub fn system_code_ranges() -> Vec<(usize, usize)> {
    // Any function of the C library that nothing interposes: its address
    // (through the GOT) lies in libc's code.
    let in_libc = libc::getpid as *const () as usize;
    // SAFETY: getauxval only reads the auxiliary vector.
    let loader_base = unsafe { libc::getauxval(libc::AT_BASE) } as usize;
    let mut found = Search {
        in_libc,
        loader_base,
        ranges: Vec::new(),
    };
    // SAFETY: the callback only reads the `dl_phdr_info` it is given for
    // the duration of the call, and `data` is the `Search` borrowed
    // mutably for that duration.
    unsafe {
        libc::dl_iterate_phdr(Some(visit), &mut found as *mut Search as *mut c_void);
    }
    found.ranges
}

struct Search {
    in_libc: usize,
    loader_base: usize,
    ranges: Vec<(usize, usize)>,
}

unsafe extern "C" fn visit(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> i32 {
    // SAFETY: dl_iterate_phdr passes a valid info and the `data` given to
    // it, a `Search`.
    let (info, search) = unsafe { (&*info, &mut *(data as *mut Search)) };
    let base = info.dlpi_addr as usize;
    // SAFETY: dlpi_phdr points at dlpi_phnum program headers.
    let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
    let loads = phdrs.iter().filter(|p| p.p_type == libc::PT_LOAD);
    let holds_libc = loads.clone().any(|p| {
        let start = base + p.p_vaddr as usize;
        (start..start + p.p_memsz as usize).contains(&search.in_libc)
    });
    if holds_libc || (search.loader_base != 0 && base == search.loader_base) {
        for p in loads.filter(|p| p.p_flags & libc::PF_X != 0) {
            let start = base + p.p_vaddr as usize;
            search.ranges.push((start, start + p.p_memsz as usize));
        }
    }
    0
}

#[cfg(test)]
mod tests {
    #[test]
    fn libc_and_the_loader_are_found() {
        let ranges = super::system_code_ranges();
        let getpid = libc::getpid as *const () as usize;
        assert!(ranges.iter().any(|&(s, e)| (s..e).contains(&getpid)));
        // This test binary's own code is neither.
        let own = libc_and_the_loader_are_found as *const () as usize;
        assert!(!ranges.iter().any(|&(s, e)| (s..e).contains(&own)));
        assert!(ranges.len() >= 2, "{ranges:x?}");
    }
}
