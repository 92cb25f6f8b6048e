//! Which CUDA libraries this machine has (for `elbo --version`), and the CUDA device, opened only
//! after checking them.
//!
//! A `--features cuda` build opens libcuda, libnvrtc, libcublas, libcublasLt and libcurand at run
//! time (cudarc's `dynamic-loading`, see `vendor/candle-core/ELBO-PATCH.md`), and cudarc panics
//! on the first call into one it cannot find. So each is `dlopen`ed here first, under the names
//! cudarc tries, and a missing one is an error naming it.

use anyhow::Result;
use candle_core::Device;

/// The device asked for by `ELBO_DEVICE`: `cpu`, `cuda` (GPU 0) or `cuda:N`; unset: the first GPU
/// in a `cuda` build, the CPU otherwise.
pub fn device() -> Result<Device> {
    let var = std::env::var("ELBO_DEVICE").unwrap_or_default();
    let want = var.trim().to_ascii_lowercase();
    let ordinal = match want.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "" if cfg!(feature = "cuda") => 0,
        "" => return Ok(Device::Cpu),
        "cuda" | "gpu" => 0,
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => i,
            _ => anyhow::bail!("ELBO_DEVICE={var:?}: expected cpu, cuda or cuda:N"),
        },
    };
    cuda_device(ordinal)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_: usize) -> Result<Device> {
    anyhow::bail!(
        "ELBO_DEVICE asks for CUDA, but this elbo was built without CUDA (scripts/build_cuda.sh \
         builds with it; ELBO_DEVICE=cpu runs on the CPU)"
    )
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    let missing: Vec<&str> = probe()
        .into_iter()
        .filter(|(_, needed, found)| *needed && found.is_none())
        .map(|(lib, _, _)| lib)
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "CUDA unavailable: missing lib{} (searched LD_LIBRARY_PATH and the system library \
             paths; ELBO_DEVICE=cpu runs on the CPU)",
            missing.join(", lib")
        );
    }
    Device::new_cuda(ordinal).map_err(|e| {
        anyhow::anyhow!("CUDA device {ordinal}: {e} (ELBO_DEVICE=cpu runs on the CPU)")
    })
}

/// Each library: its name, whether candle's CUDA backend needs it, and the file name it opened
/// under (`None`: missing).
#[cfg(feature = "cuda")]
fn probe() -> Vec<(&'static str, bool, Option<String>)> {
    const LIBS: [(&str, bool); 6] = [
        ("cuda", true),
        ("cudart", false),
        ("nvrtc", true),
        ("cublas", true),
        ("cublasLt", true),
        ("curand", true),
    ];
    LIBS.iter()
        .map(|&(lib, needed)| {
            let found = cudarc::get_lib_name_candidates(lib)
                .into_iter()
                .find(|name| {
                    // SAFETY: loading a CUDA library runs only its initialisers, as cudarc's own
                    // lookup does; it is closed again when dropped.
                    unsafe { libloading::Library::new(name) }.is_ok()
                });
            (lib, needed, found)
        })
        .collect()
}

/// One line for `elbo --version`: how CUDA stands in this binary on this machine.
#[cfg(not(feature = "cuda"))]
pub fn report() -> String {
    "CUDA: built without CUDA (scripts/build_cuda.sh builds with it)".to_string()
}

/// One line for `elbo --version`: how CUDA stands in this binary on this machine.
#[cfg(feature = "cuda")]
pub fn report() -> String {
    let libs = probe();
    let list = libs
        .iter()
        .map(|(lib, needed, found)| match (found, needed) {
            (Some(f), _) => format!("lib{lib} found ({f})"),
            (None, true) => format!("lib{lib} MISSING"),
            (None, false) => format!("lib{lib} missing (not needed)"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    // what scripts/build_cuda.sh set (cargo rebuilds when they change)
    let built = format!(
        "PTX for compute capability {}, cudarc API {}",
        option_env!("CUDA_COMPUTE_CAP").unwrap_or("of the build machine's GPU"),
        option_env!("CUDARC_CUDA_VERSION").unwrap_or("of the build machine's nvcc"),
    );
    let status = if libs.iter().any(|(_, needed, f)| *needed && f.is_none()) {
        "unavailable (libraries missing; runs with ELBO_DEVICE=cpu)".to_string()
    } else {
        // libcuda was found above, so cudarc's lookup of it succeeds (no panic)
        let count = cudarc::driver::result::init()
            .and_then(|()| cudarc::driver::result::device::get_count());
        match count {
            Ok(n) if n > 0 => format!("available, {n} GPU(s)"),
            Ok(_) => "unavailable (no GPU; runs with ELBO_DEVICE=cpu)".to_string(),
            Err(e) => format!("unavailable ({e:?}; runs with ELBO_DEVICE=cpu)"),
        }
    };
    format!("CUDA: {status}; built with {built}\nCUDA libraries: {list}")
}
