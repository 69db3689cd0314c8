//! The denoising loop's GPU kernels (`ops::latent`) against their CPU
//! references: every scheduler's step program (the multistep ones with
//! their state on the GPU), `add_noise` as a program, camera guidance's mix
//! and the still's frame, guidance, the model's input batch, the per-frame
//! repeat of embeddings, the decode's regrouping and the RGB8 frames.

mod common;

use motif_engine::ops::latent;
use motif_engine::schedulers::{Scheduler, SchedulerConfig, SchedulerKind};
use motif_engine::{DType, Tensor};

fn f32_tensor(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_f32(common::gpu(), values, shape, DType::F32).unwrap()
}

/// Elements whose bits differ, and the largest difference relative to the
/// largest magnitude of `want`.
fn compare(got: &[f32], want: &[f32]) -> (usize, f32) {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
    let differ = got
        .iter()
        .zip(want)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0f32, f32::max);
    (differ, worst)
}

fn config(json: &str) -> SchedulerConfig {
    SchedulerConfig::from_json(
        serde_json::from_str(json).unwrap(),
        std::path::Path::new("(test)"),
    )
    .unwrap()
}

#[test]
fn step_programs_on_the_gpu_match_the_schedulers_on_the_cpu() {
    let gpu = common::gpu();
    let n = 4 * 3 * 5 * 7;
    let diffusion = |prediction: &str, clip: bool| {
        config(&format!(
            r#"{{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "prediction_type": "{prediction}", "clip_sample": {clip},
             "set_alpha_to_one": false, "steps_offset": 1}}"#
        ))
    };
    let flow = config(
        r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000}"#,
    );
    let mut cases: Vec<(String, SchedulerConfig, SchedulerKind)> = Vec::new();
    for prediction in ["epsilon", "v_prediction", "sample"] {
        for kind in [
            SchedulerKind::Ddim,
            SchedulerKind::Euler,
            SchedulerKind::EulerAncestral,
            SchedulerKind::Lcm,
        ] {
            for clip in [false, true] {
                if clip && !matches!(kind, SchedulerKind::Ddim | SchedulerKind::Lcm) {
                    continue;
                }
                let name = format!("{kind} {prediction} clip={clip}");
                cases.push((name, diffusion(prediction, clip), kind));
            }
        }
    }
    cases.push(("flow-euler".into(), flow, SchedulerKind::FlowMatchEuler));
    // The multistep kinds, with their history of earlier steps on the GPU:
    // DPM-Solver++ 2M on each prediction type, midpoint and Heun, with and
    // without Karras sigmas; UniPC of order 2 and 1, bh1 and bh2, with a
    // disabled corrector.
    for (prediction, extra) in [
        ("epsilon", ""),
        ("v_prediction", r#", "use_karras_sigmas": true"#),
        ("sample", r#", "solver_type": "heun""#),
        (
            "epsilon",
            r#", "use_karras_sigmas": true, "final_sigmas_type": "sigma_min", "lower_order_final": false"#,
        ),
    ] {
        let cfg = config(&format!(
            r#"{{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "prediction_type": "{prediction}"{extra}}}"#
        ));
        cases.push((
            format!("dpm++2m {prediction}{extra}"),
            cfg,
            SchedulerKind::DpmPp2m,
        ));
    }
    for extra in [
        "",
        r#", "solver_type": "bh1", "disable_corrector": [2]"#,
        r#", "solver_order": 1"#,
        r#", "final_sigmas_type": "sigma_min", "lower_order_final": false"#,
    ] {
        let cfg = config(&format!(
            r#"{{"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": true,
             "prediction_type": "flow_prediction", "flow_shift": 3.0,
             "num_train_timesteps": 1000{extra}}}"#
        ));
        cases.push((format!("unipc{extra}"), cfg, SchedulerKind::UniPc));
    }
    let mut bit_different = 0;
    for (name, cfg, kind) in cases {
        // Not every kind takes every prediction type (Euler has no "sample").
        let Ok(mut on_gpu) = Scheduler::new(&cfg, Some(kind), None) else {
            assert!(!name.contains("epsilon"), "{name}");
            assert!(
                !matches!(kind, SchedulerKind::DpmPp2m | SchedulerKind::UniPc),
                "{name}"
            );
            continue;
        };
        let mut on_cpu = Scheduler::new(&cfg, Some(kind), None).unwrap();
        on_gpu.set_timesteps(6).unwrap();
        on_cpu.set_timesteps(6).unwrap();
        let mut sample = common::random(n, 1);
        let mut sample_t = f32_tensor(&sample, &[n]);
        for step in 0..6 {
            let model_output = common::random(n, 10 + step as u64);
            let noise = common::random(n, 100 + step as u64);
            let program = on_gpu.step_program(step).unwrap();
            let want = on_cpu
                .step(&model_output, step, &sample, Some(&noise))
                .unwrap();
            let m = f32_tensor(&model_output, &[n]);
            let noise_t = f32_tensor(&noise, &[n]);
            let mut inputs = vec![&sample_t, &m];
            if program.reads_noise() {
                inputs.push(&noise_t);
            }
            let mut outs = on_gpu.run_step(gpu, &program, &inputs).unwrap();
            assert_eq!(outs.len(), if program.writes_denoised() { 3 } else { 2 });
            let got_x0 = outs[program.preview_output()].to_f32(gpu).unwrap();
            let want_x0 = want.denoised.as_ref().unwrap_or(&want.pred_original);
            let got_prev = outs[0].to_f32(gpu).unwrap();
            for (what, got, want) in [
                ("prev_sample", &got_prev, &want.prev_sample),
                ("x0", &got_x0, want_x0),
            ] {
                let (differ, worst) = compare(got, want);
                bit_different += differ;
                assert!(
                    worst <= 1e-6,
                    "{name}, step {step}, {what}: off by {worst} of the largest value"
                );
            }
            sample = want.prev_sample;
            sample_t = outs.swap_remove(0);
        }
    }
    eprintln!("step programs: {bit_different} values differ in their bits from the CPU's");
}

#[test]
fn a_multistep_step_refuses_history_kept_elsewhere() {
    let cfg = config(
        r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "num_train_timesteps": 1000}"#,
    );
    let gpu = common::gpu();
    let n = 8;
    let mut s = Scheduler::new(&cfg, Some(SchedulerKind::DpmPp2m), None).unwrap();
    s.set_timesteps(4).unwrap();
    // Step 0 on the CPU keeps its x0 there; step 1 (second order) on the
    // GPU has no earlier x0 to read.
    let x = common::random(n, 1);
    s.step(&common::random(n, 2), 0, &x, None).unwrap();
    let program = s.step_program(1).unwrap();
    let (xt, mt) = (f32_tensor(&x, &[n]), f32_tensor(&x, &[n]));
    let err = s
        .run_step(gpu, &program, &[&xt, &mt])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("dpm++2m step 1") && err.contains("run_step"),
        "{err}"
    );
    // A caller that gives the noise to a step that reads none.
    s.set_timesteps(4).unwrap();
    let program = s.step_program(0).unwrap();
    let err = s
        .run_step(gpu, &program, &[&xt, &mt, &mt])
        .unwrap_err()
        .to_string();
    assert!(err.contains("reads 2 inputs"), "{err}");
}

#[test]
fn add_noise_as_a_program_equals_every_scheduler_s_add_noise() {
    let gpu = common::gpu();
    let n = 3 * 5 * 7;
    let diffusion = config(
        r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "num_train_timesteps": 1000}"#,
    );
    let flow = config(
        r#"{"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": true,
         "prediction_type": "flow_prediction", "flow_shift": 3.0}"#,
    );
    let x = common::random(n, 3);
    let noise = common::random(n, 4);
    let (xt, nt) = (f32_tensor(&x, &[n]), f32_tensor(&noise, &[n]));
    for kind in SchedulerKind::ALL {
        let cfg = if kind.is_flow_matching() {
            &flow
        } else {
            &diffusion
        };
        let mut s = Scheduler::new(cfg, Some(kind), None).unwrap();
        s.set_timesteps(5).unwrap();
        for &t in &s.timesteps()[1..] {
            let want = s.add_noise(&x, &noise, t).unwrap();
            let program = s.add_noise_program(t).unwrap();
            let cpu = latent::run_program_reference(&program, &[&x, &noise]).swap_remove(0);
            assert_eq!(
                cpu.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{kind} at {t}: the program's bits"
            );
            let got = latent::run_program(gpu, &program, &[&xt, &nt]).unwrap();
            let (_, worst) = compare(&got[0].to_f32(gpu).unwrap(), &want);
            assert!(worst <= 1e-6, "{kind} at {t}: on the GPU off by {worst}");
        }
    }
}

#[test]
fn camera_mix_and_put_frame_match_their_references() {
    let gpu = common::gpu();
    let shape = [4, 5, 3, 6];
    let [c, f, h, w] = shape;
    let n = c * f * h * w;
    let plane = h * w;
    let x = common::random(n, 21);
    let x0 = common::random(n, 22);
    // Any four pixels of the plane and weights in [0, 1).
    let mut warp = Vec::new();
    let r = common::random((f - 1) * plane * 6, 23);
    for px in r.chunks(6) {
        for &v in &px[..4] {
            warp.push(((v.abs() * 1000.0) as usize % plane) as f32);
        }
        warp.extend(px[4..].iter().map(|v| v.abs().fract()));
    }
    let mix = latent::CameraMix {
        a: 0.8,
        b: 0.6,
        keep_x: 0.3,
        take_x: 0.7,
        keep_e: 0.3f32.sqrt(),
        take_e: 0.7f32.sqrt(),
    };
    let want = latent::camera_mix_reference(&x, &x0, &warp, shape, mix);
    let (xt, x0t) = (f32_tensor(&x, &shape), f32_tensor(&x0, &shape));
    let warp_t = f32_tensor(&warp, &[f - 1, plane, latent::WARP_VALUES]);
    let got = latent::camera_mix(gpu, &xt, &x0t, &warp_t, mix)
        .unwrap()
        .to_f32(gpu)
        .unwrap();
    let (differ, worst) = compare(&got, &want);
    assert!(
        worst <= 1e-6,
        "camera_mix off by {worst} ({differ} values differ)"
    );
    // Frame 0 is copied, every other frame moved.
    for ch in 0..c {
        let o = ch * f * plane;
        assert_eq!(got[o..o + plane], x[o..o + plane]);
        assert_ne!(got[o + plane..o + 2 * plane], x[o + plane..o + 2 * plane]);
    }
    let short = f32_tensor(&warp[6..], &[warp.len() - 6]);
    let err = latent::camera_mix(gpu, &xt, &x0t, &short, mix).unwrap_err();
    assert!(err.to_string().contains("warp table"), "{err}");

    let frame = common::random(c * plane, 24);
    let ft = f32_tensor(&frame, &[c, h, w]);
    for index in [0, f - 1] {
        let got = latent::put_frame(gpu, &xt, index, &ft).unwrap();
        let mut want = x.clone();
        latent::put_frame_reference(&mut want, shape, index, &frame);
        assert_eq!(got.to_f32(gpu).unwrap(), want, "frame {index}");
    }
    assert!(latent::put_frame(gpu, &xt, f, &ft).is_err());
    assert!(latent::put_frame(gpu, &xt, 0, &xt).is_err());
}

#[test]
fn guidance_batch_and_repeat_match_their_references() {
    let gpu = common::gpu();
    let n = 3 * 4 * 5;
    for dtype in common::dtypes() {
        let pred_values = common::random(2 * n, 3);
        let (pred, stored) = common::upload(gpu, &pred_values, &[2, 3, 4, 5], dtype);
        let got = latent::guide(gpu, &pred, 7.5).unwrap().to_f32(gpu).unwrap();
        assert_eq!(got, latent::guide_reference(&stored, 2, 7.5), "{dtype}");
        let (u, _) = common::upload(gpu, &pred_values[..n], &[1, n], dtype);
        let (c, _) = common::upload(gpu, &pred_values[n..], &[1, n], dtype);
        let pair = latent::guide_pair(gpu, Some(&u), &c, 7.5).unwrap();
        assert_eq!(pair.to_f32(gpu).unwrap(), got, "{dtype}: guide_pair");
        let single = latent::guide_pair(gpu, None, &c, 7.5).unwrap();
        assert_eq!(
            single.to_f32(gpu).unwrap(),
            stored[n..],
            "{dtype}: no guidance"
        );

        let x = common::random(n, 4);
        let xt = f32_tensor(&x, &[3, 4, 5]);
        let batch = latent::batch_input(gpu, &xt, 1.25, 2, dtype).unwrap();
        assert_eq!(batch.shape(), &[2, 3, 4, 5]);
        let scaled: Vec<f32> = x.iter().map(|v| v / 1.25).collect();
        let want: Vec<f32> = [
            common::stored(&scaled, dtype),
            common::stored(&scaled, dtype),
        ]
        .concat();
        assert_eq!(batch.to_f32(gpu).unwrap(), want, "{dtype}: batch_input");

        let rows = common::random(2 * 6, 5);
        let (rt, stored_rows) = common::upload(gpu, &rows, &[2, 6], dtype);
        let rep = latent::repeat_rows(gpu, &rt, 3).unwrap();
        assert_eq!(rep.shape(), &[2, 3, 6]);
        let want: Vec<f32> = stored_rows.chunks(6).flat_map(|r| r.repeat(3)).collect();
        assert_eq!(rep.to_f32(gpu).unwrap(), want, "{dtype}: repeat_rows");
    }
}

#[test]
fn decode_regrouping_and_rgb8_frames_match_their_references() {
    let gpu = common::gpu();
    let (c, f, h, w) = (4, 5, 3, 2);
    let x = common::random(c * f * h * w, 6);
    let xt = f32_tensor(&x, &[c, f, h, w]);
    let z = latent::latent_frames(gpu, &xt, 1, 3, DType::F32).unwrap();
    assert_eq!(z.shape(), &[3, c, h, w]);
    let mut want = Vec::new();
    for fi in 1..4 {
        for ch in 0..c {
            let o = (ch * f + fi) * h * w;
            want.extend_from_slice(&x[o..o + h * w]);
        }
    }
    assert_eq!(z.to_f32(gpu).unwrap(), want);
    assert!(latent::latent_frames(gpu, &xt, 3, 3, DType::F32).is_err());

    // Values over the whole range and past it, and the ones that land on
    // a half between two bytes.
    let (n, hh, ww) = (2, 5, 7);
    let mut images = common::random(n * 3 * hh * ww, 7);
    for (i, v) in images.iter_mut().enumerate() {
        *v *= 1.3;
        if i % 11 == 0 {
            *v = ((i % 255) as f32 + 0.5) / 255.0 * 2.0 - 1.0;
        }
    }
    for dtype in common::dtypes() {
        let (t, stored) = common::upload(gpu, &images, &[n, 3, hh, ww], dtype);
        let got = latent::frames_rgb8(gpu, &t).unwrap();
        assert_eq!(got.len(), n);
        for (i, (frame, image)) in got.iter().zip(stored.chunks(3 * hh * ww)).enumerate() {
            let mut out = vec![0f32; hh * ww * 3];
            let want = latent::frame_reference(image, &mut out);
            assert_eq!(frame, &want, "{dtype}: frame {i}");
        }
    }
}
