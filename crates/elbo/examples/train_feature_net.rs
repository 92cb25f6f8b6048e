//! Trains the digit classifier whose features the Fréchet distance compares, writes its
//! weights and prints their FNV-1a hash (to record in `elbo::eval::feature_net`):
//!
//! ```text
//! cargo run --release -p elbo --example train_feature_net -- digits data/classifiers/digits.safetensors
//! cargo run --release -p elbo --example train_feature_net -- mnist data/classifiers/mnist.safetensors
//! ```

use elbo::eval::feature_net::{FeatureData, FeatureNet};
use elbo::train::checkpoint::fnv1a64;

fn main() -> elbo::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(name), Some(out)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: train_feature_net digits|mnist OUT.safetensors");
        std::process::exit(2);
    };
    let data = FeatureData::from_name(name)?;
    let steps = match data {
        FeatureData::Digits => 1500,
        FeatureData::Mnist => 3000,
    };
    let (net, acc) = FeatureNet::train(data, steps, 18)?;
    let path = std::path::Path::new(out);
    net.save(path)?;
    let bytes = std::fs::read(path).map_err(|e| elbo::Error::io(path, e))?;
    println!(
        "{name}: {steps} steps, training accuracy {acc:.4}, {} bytes, FNV-1a {:016x}",
        bytes.len(),
        fnv1a64(&bytes)
    );
    Ok(())
}
