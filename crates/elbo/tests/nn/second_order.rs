//! Second derivatives through the vendored candle's `Tensor::backward_create_graph`
//! (ELBO-PATCH.md change 5): the gradient of a gradient, checked against closed forms and
//! against central finite differences of the first gradient.

use candle_core::{Device, Tensor, Var};

/// `f(x) = sum x^3`: the first gradient is `3 x^2`, and the gradient of `sum (3 x^2)` is `6 x`.
#[test]
fn gradient_of_a_gradient_matches_the_closed_form() -> candle_core::Result<()> {
    let x = Var::new(&[0.5f64, -1.25, 2.0], &Device::Cpu)?;
    let f = x.as_tensor().powf(3.0)?.sum_all()?;
    let g = f.backward_create_graph()?;
    let dx = g.get(x.as_tensor()).expect("gradient of x");
    let want: Vec<f64> = [0.5f64, -1.25, 2.0].iter().map(|v| 3.0 * v * v).collect();
    assert_eq!(dx.to_vec1::<f64>()?, want);
    let h = dx.sum_all()?.backward()?;
    let d2 = h
        .get(x.as_tensor())
        .expect("second gradient")
        .to_vec1::<f64>()?;
    for (got, v) in d2.iter().zip([0.5f64, -1.25, 2.0]) {
        assert!((got - 6.0 * v).abs() < 1e-12, "{got} vs {}", 6.0 * v);
    }
    Ok(())
}

/// Plain `backward` still detaches each node's incoming gradient: for `f(x) = sum (2x)^3`
/// (`f'' = 48 x`) the first gradient loses its graph at the inner node, so differentiating it
/// again gives nothing, where `backward_create_graph` gives the closed form.
#[test]
fn plain_backward_still_detaches() -> candle_core::Result<()> {
    let vals = [0.5f64, -1.25];
    let x = Var::new(&vals, &Device::Cpu)?;
    let f = || -> candle_core::Result<Tensor> { (x.as_tensor() * 2.0)?.powf(3.0)?.sum_all() };
    let plain = f()?.backward()?;
    let dx = plain.get(x.as_tensor()).expect("gradient of x");
    let second = dx.sum_all()?.backward()?;
    assert!(
        second.get(x.as_tensor()).is_none(),
        "plain backward kept the graph"
    );
    let kept = f()?.backward_create_graph()?;
    let dx = kept.get(x.as_tensor()).expect("gradient of x");
    let d2 = dx.sum_all()?.backward()?;
    let d2 = d2
        .get(x.as_tensor())
        .expect("second gradient")
        .to_vec1::<f64>()?;
    for (got, v) in d2.iter().zip(vals) {
        assert!((got - 48.0 * v).abs() < 1e-9, "{got} vs {}", 48.0 * v);
    }
    Ok(())
}

/// A two-layer tanh critic `c(x) = w2 . tanh(W1 x + b1)`: the gradient penalty
/// `P(W1) = mean_i (|grad_x c(x_i)| - 1)^2` differentiated through `backward_create_graph`,
/// against central finite differences of `P` in every entry of `W1`.
#[test]
fn gradient_penalty_gradient_matches_finite_differences() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let w1_init = Tensor::new(&[[0.3f64, -0.7], [1.1, 0.4], [-0.5, 0.9]], &dev)?; // [H=3, D=2]
    let b1 = Tensor::new(&[0.1f64, -0.2, 0.05], &dev)?;
    let w2 = Tensor::new(&[[0.8f64], [-1.3], [0.6]], &dev)?; // [H, 1]
    let xs = Tensor::new(
        &[[0.2f64, -0.4], [1.0, 0.5], [-0.3, 0.8], [0.0, -1.1]],
        &dev,
    )?; // [B, D]

    let penalty = |w1: &Tensor| -> candle_core::Result<(Tensor, Var)> {
        let x = Var::from_tensor(&xs)?;
        let h = x.as_tensor().matmul(&w1.t()?)?.broadcast_add(&b1)?.tanh()?; // [B, H]
        let c = h.matmul(&w2)?.sum_all()?;
        let grads = c.backward_create_graph()?;
        let gx = grads.get(x.as_tensor()).expect("grad x").clone(); // [B, D]
        let norm = gx.sqr()?.sum_keepdim(1)?.sqrt()?; // [B, 1]
        let p = (norm - 1.0)?.sqr()?.mean_all()?;
        Ok((p, x))
    };

    let w1 = Var::from_tensor(&w1_init)?;
    let (p, _) = penalty(w1.as_tensor())?;
    let analytic = p
        .backward()?
        .get(w1.as_tensor())
        .expect("grad W1")
        .to_vec2::<f64>()?;

    let eps = 1e-6;
    let base = w1_init.to_vec2::<f64>()?;
    for i in 0..3 {
        for j in 0..2 {
            let mut plus = base.clone();
            plus[i][j] += eps;
            let mut minus = base.clone();
            minus[i][j] -= eps;
            let pp = penalty(&Tensor::new(plus, &dev)?)?.0.to_scalar::<f64>()?;
            let pm = penalty(&Tensor::new(minus, &dev)?)?.0.to_scalar::<f64>()?;
            let fd = (pp - pm) / (2.0 * eps);
            assert!(
                (analytic[i][j] - fd).abs() < 1e-7 * (1.0 + fd.abs()),
                "dP/dW1[{i}][{j}]: autograd {} vs finite differences {fd}",
                analytic[i][j]
            );
            assert!(
                fd.abs() > 1e-4,
                "entry [{i}][{j}] has a vanishing gradient: the test is weak"
            );
        }
    }
    Ok(())
}
