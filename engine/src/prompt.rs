//! Prompt weighting in the syntax creators know from Stable Diffusion UIs:
//! `(word)` multiplies attention to `word` by 1.1, `((word))` by 1.21,
//! `[word]` divides it by 1.1, `(word:1.3)` sets 1.3; `\(` and `\)` are
//! literal brackets. The weights scale the text encoder's output per token,
//! then the whole embedding is rescaled to its original mean (the method of
//! the AUTOMATIC1111 web UI), so emphasis shifts attention without changing
//! the overall magnitude. A prompt without brackets is encoded exactly as
//! the plain tokenizer does.

use crate::text::tokenizer::{ClipTokenizer, MAX_LENGTH};

const UP: f32 = 1.1;

/// A prompt split into runs of text with their weights.
pub fn parse(prompt: &str) -> Vec<(String, f32)> {
    let mut out: Vec<(String, f32)> = Vec::new();
    // Stack of open brackets: (kind, index in `out` where the group starts).
    let mut stack: Vec<(char, usize)> = Vec::new();
    let mut text = String::new();
    let mut weight = 1.0f32;
    let flush = |text: &mut String, weight: f32, out: &mut Vec<(String, f32)>| {
        if !text.is_empty() {
            out.push((std::mem::take(text), weight));
        }
    };
    let mut chars = prompt.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if matches!(chars.peek(), Some('(' | ')' | '[' | ']' | '\\')) => {
                text.push(chars.next().unwrap_or('\\'));
            }
            '(' | '[' => {
                flush(&mut text, weight, &mut out);
                stack.push((c, out.len()));
                weight *= if c == '(' { UP } else { 1.0 / UP };
            }
            ')' if stack.last().map(|s| s.0) == Some('(') => {
                // `(text:1.3)`: an explicit weight replaces the 1.1 factor.
                let explicit = text.rsplit_once(':').and_then(|(head, w)| {
                    w.trim().parse::<f32>().ok().map(|w| (head.to_string(), w))
                });
                let (_, start) = stack.pop().unwrap_or(('(', 0));
                let outer = weight / UP;
                match explicit {
                    Some((head, w)) if w.is_finite() => {
                        text = head;
                        let factor = w / UP;
                        for run in out.iter_mut().skip(start) {
                            run.1 *= factor;
                        }
                        flush(&mut text, outer * w, &mut out);
                    }
                    _ => flush(&mut text, weight, &mut out),
                }
                weight = outer;
            }
            ']' if stack.last().map(|s| s.0) == Some('[') => {
                flush(&mut text, weight, &mut out);
                stack.pop();
                weight *= UP;
            }
            _ => text.push(c),
        }
    }
    flush(&mut text, weight, &mut out);
    out
}

/// Whether `prompt` uses any weighting syntax.
pub fn has_weights(prompt: &str) -> bool {
    prompt.contains(['(', ')', '[', ']'])
}

/// The 77 ids and per-position weights of a (possibly weighted) prompt:
/// BOS, up to 75 tokens, EOS, EOS padding; specials weigh 1.
pub fn encode(tokenizer: &ClipTokenizer, prompt: &str) -> ([u32; MAX_LENGTH], [f32; MAX_LENGTH]) {
    let mut weights = [1.0f32; MAX_LENGTH];
    if !has_weights(prompt) {
        return (tokenizer.encode(prompt), weights);
    }
    let mut tokens: Vec<(u32, f32)> = Vec::new();
    for (text, w) in parse(prompt) {
        tokens.extend(tokenizer.tokens(&text).into_iter().map(|t| (t, w)));
    }
    tokens.truncate(MAX_LENGTH - 2);
    let plain = tokenizer.encode("");
    let mut ids = plain;
    for (i, (t, w)) in tokens.iter().enumerate() {
        ids[i + 1] = *t;
        weights[i + 1] = *w;
    }
    ids[tokens.len() + 1] = plain[1];
    (ids, weights)
}

/// Applies per-token weights to one prompt's hidden states [77, D] in place,
/// keeping the mean of the whole embedding.
pub fn apply_weights(hidden: &mut [f32], weights: &[f32; MAX_LENGTH]) {
    if weights.iter().all(|&w| w == 1.0) || hidden.is_empty() {
        return;
    }
    let dim = hidden.len() / MAX_LENGTH;
    let before: f64 = hidden.iter().map(|&v| v as f64).sum::<f64>();
    for (row, &w) in hidden.chunks_mut(dim).zip(weights.iter()) {
        for v in row {
            *v *= w;
        }
    }
    let after: f64 = hidden.iter().map(|&v| v as f64).sum::<f64>();
    if after != 0.0 {
        let k = (before / after) as f32;
        for v in hidden.iter_mut() {
            *v *= k;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[(String, f32)], b: &[(&str, f32)]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|((t, w), (u, v))| t == u && (w - v).abs() < 1e-5)
    }

    #[test]
    fn brackets_and_explicit_weights() {
        let p = parse("a (red:1.3) ball, ((bouncing)) on [grass]");
        assert!(
            close(
                &p,
                &[
                    ("a ", 1.0),
                    ("red", 1.3),
                    (" ball, ", 1.0),
                    ("bouncing", 1.21),
                    (" on ", 1.0),
                    ("grass", 1.0 / 1.1)
                ]
            ),
            "{p:?}"
        );
        let p = parse("(a (cat:1.5) here:0.5) x");
        assert!(
            close(
                &p,
                &[("a ", 0.5), ("cat", 0.75), (" here", 0.5), (" x", 1.0)]
            ),
            "{p:?}"
        );
        let p = parse(r"literal \(brackets\) stay");
        assert!(close(&p, &[("literal (brackets) stay", 1.0)]), "{p:?}");
        // Unmatched closers are plain text.
        let p = parse("smile :) ok");
        assert!(close(&p, &[("smile :) ok", 1.0)]), "{p:?}");
    }

    #[test]
    fn weighting_keeps_the_mean_and_leaves_unit_weights_alone() {
        let mut h: Vec<f32> = (0..MAX_LENGTH * 2)
            .map(|i| (i as f32 * 0.37).sin() + 0.5)
            .collect();
        let orig = h.clone();
        apply_weights(&mut h, &[1.0; MAX_LENGTH]);
        assert_eq!(h, orig);
        let mut w = [1.0; MAX_LENGTH];
        w[3] = 1.5;
        apply_weights(&mut h, &w);
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>();
        assert!((mean(&h) - mean(&orig)).abs() < 1e-3);
        assert!(h[6] / h[0] > orig[6] / orig[0]);
    }
}
