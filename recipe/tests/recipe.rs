//! Reading and checking recipes: every error names its field.

use motif_recipe::{CameraMove, FieldError, Lora, Recipe, RecipeError, Scheduler};
use serde_json::json;

fn field_of(json: serde_json::Value) -> String {
    match Recipe::from_value(json.clone()) {
        Err(e) => e.field().unwrap_or("(none)").to_string(),
        Ok(r) => r.validate().err().map_or("(valid)".into(), |e| e.field),
    }
}

#[test]
fn unknown_fields_are_refused_by_name() {
    let e = Recipe::from_value(json!({"prompt": "a", "promt": "b"})).unwrap_err();
    assert_eq!(e.field(), Some("promt"));
    assert!(e.to_string().contains("unknown field `promt`"), "{e}");
}

#[test]
fn ill_typed_fields_are_refused_by_name() {
    for (json, field) in [
        (json!({"prompt": 1}), "prompt"),
        (json!({"prompt": "a", "width": "wide"}), "width"),
        (json!({"prompt": "a", "width": -8}), "width"),
        (json!({"prompt": "a", "seed": 1.5}), "seed"),
        (json!({"prompt": "a", "karras": "yes"}), "karras"),
        (
            json!({"prompt": "a", "loras": [["a.safetensors"]]}),
            "loras",
        ),
        (json!({"prompt": "a", "camera": "sideways"}), "camera"),
        (json!({"prompt": "a", "scheduler": "heun"}), "scheduler"),
        (
            json!({"format": "motif-recipe-v2", "prompt": "a"}),
            "format",
        ),
        (json!({"prompt": "a", "shift": "high"}), "shift"),
    ] {
        let e = Recipe::from_value(json.clone()).unwrap_err();
        assert_eq!(e.field(), Some(field), "{json}: {e}");
    }
    let e = Recipe::from_value(json!({"camera": "sideways"})).unwrap_err();
    assert!(
        e.to_string().contains("unknown camera move `sideways`"),
        "{e}"
    );
    assert_eq!(
        Recipe::from_value(json!([1])),
        Err(RecipeError::NotAnObject)
    );
}

#[test]
fn a_recipe_file_needs_its_format_tag() {
    assert_eq!(
        Recipe::from_json(r#"{"prompt": "a"}"#),
        Err(RecipeError::NotARecipe)
    );
    assert_eq!(RecipeError::NotARecipe.field(), Some("format"));
    assert!(matches!(
        Recipe::from_json("{\"prompt\""),
        Err(RecipeError::Json(_))
    ));
    let r = Recipe::from_json(r#"{"format": "motif-recipe-v1", "prompt": "a", "style": null}"#)
        .unwrap();
    assert_eq!(r.prompt.as_deref(), Some("a"));
    assert_eq!(r.style, None);
}

#[test]
fn validate_names_the_field_of_each_rule() {
    for (json, field) in [
        (json!({"width": 30}), "width"),
        (json!({"width": 0}), "width"),
        (json!({"height": 12}), "height"),
        (json!({"aspect": "16x9"}), "aspect"),
        (json!({"aspect": "0:9"}), "aspect"),
        (json!({"frames": 0}), "frames"),
        (json!({"steps": 0}), "steps"),
        (json!({"fps": 0}), "fps"),
        (json!({"fps": 121}), "fps"),
        (json!({"guidance": -1}), "guidance"),
        (json!({"guidance_2": -0.5}), "guidance_2"),
        (json!({"motion": 4.5}), "motion"),
        (json!({"motion": -1}), "motion"),
        (json!({"strength": 0}), "strength"),
        (json!({"strength": 1.5}), "strength"),
        (json!({"video_strength": 0}), "video_strength"),
        (json!({"clip_skip": 2}), "clip_skip"),
        (json!({"shift": 0}), "shift"),
        (json!({"loras": [["", 1.0]]}), "loras"),
    ] {
        assert_eq!(field_of(json.clone()), field, "{json}");
    }
    let ok = json!({"prompt": "a", "width": 64, "height": 48, "aspect": "16:9", "frames": 4,
        "steps": 1, "fps": 120, "guidance": 0, "motion": 4, "strength": 1, "clip_skip": 1,
        "shift": 5.0, "guidance_2": 3.0, "video_strength": 0.5});
    assert_eq!(field_of(ok), "(valid)");
    let e = Recipe::from_value(json!({"motion": 7}))
        .unwrap()
        .validate()
        .unwrap_err();
    assert_eq!(
        e,
        FieldError::new(
            "motion",
            "7: expected a value from 0 (nearly still) to 4 (strong)"
        )
    );
}

#[test]
fn names_parse_and_print_as_the_cli_spells_them() {
    for &c in CameraMove::ALL {
        assert_eq!(c.name().parse::<CameraMove>(), Ok(c));
    }
    for &s in Scheduler::ALL {
        assert_eq!(s.name().parse::<Scheduler>(), Ok(s));
    }
    assert_eq!(Scheduler::DpmPp2m.name(), "dpm++2m");
    assert_eq!(CameraMove::RollCcw.to_string(), "roll-ccw");
    assert!("heun".parse::<Scheduler>().unwrap_err().contains("euler-a"));
}

#[test]
fn loras_parse_with_an_optional_weight() {
    assert_eq!(
        Lora::parse("a.safetensors"),
        Ok(Lora("a.safetensors".into(), 1.0))
    );
    assert_eq!(
        Lora::parse("C:\\l.safetensors:0.5"),
        Ok(Lora("C:\\l.safetensors".into(), 0.5))
    );
    assert_eq!(Lora::parse("a:inf").unwrap_err().field, "loras");
}

#[test]
fn flags_override_a_recipe_field_by_field() {
    let base =
        Recipe::from_value(json!({"prompt": "a", "width": 64, "loras": [["l", 0.5]]})).unwrap();
    let flags = Recipe {
        width: Some(32),
        seed: Some(3),
        ..Default::default()
    };
    let r = flags.over(base);
    assert_eq!(
        (r.prompt.as_deref(), r.width, r.seed),
        (Some("a"), Some(32), Some(3))
    );
    assert_eq!(r.loras, vec![Lora("l".into(), 0.5)]);
}

#[test]
fn later_families_controls_are_listed_for_refusal() {
    let r = Recipe::from_value(json!({"shift": 3.0, "video": "in.mp4"})).unwrap();
    assert_eq!(r.family_controls(), vec!["shift", "video"]);
    assert!(Recipe::default().family_controls().is_empty());
}

#[test]
fn sizes_resolve_as_generate_makes_them() {
    let r = |v| Recipe::from_value(v).unwrap();
    assert_eq!(r(json!({})).size((512, 512), 8), Ok((512, 512)));
    assert_eq!(
        r(json!({"aspect": "16:9"})).size((512, 512), 8),
        Ok((680, 384))
    );
    assert_eq!(
        r(json!({"width": 64, "aspect": "2:1"})).size((512, 512), 8),
        Ok((64, 32))
    );
    assert_eq!(r(json!({"height": 24})).size((32, 32), 8), Ok((32, 24)));
    assert_eq!(
        r(json!({"width": 24}))
            .size((32, 32), 16)
            .unwrap_err()
            .field,
        "width"
    );
}

#[test]
fn written_recipes_keep_the_release_layout() {
    // The fields the release always wrote come out as null when absent;
    // the fields added since stay out, so old readers see what they knew.
    let text = Recipe {
        prompt: Some("a".into()),
        ..Default::default()
    }
    .to_json_pretty();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["format"], "motif-recipe-v1");
    assert!(v["style"].is_null() && v.get("style").is_some());
    assert_eq!(v["loras"], json!([]));
    for later in [
        "aspect",
        "shift",
        "guidance_2",
        "last_image",
        "video",
        "video_strength",
    ] {
        assert!(v.get(later).is_none(), "{later} written: {text}");
    }
    assert_eq!(
        Recipe::from_json(&text).unwrap().prompt.as_deref(),
        Some("a")
    );
}
