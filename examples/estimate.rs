//! Prints the prompt estimate of texts, for `bench/estimate`. The figures are the gateway's own
//! code, not a re-implementation.
//!
//! - `estimate`: reads one JSON string per line on stdin and prints, per line, the tokens
//!   `tiergate::estimate::prompt_tokens_of_text` gives it.
//! - `estimate --learn`: reads `[text, real_tokens]` per line, as one workspace sending them in
//!   order to one model, and prints per line the prompt the `Estimator` reserves (the rule times
//!   the factor learned so far), then settles it as an upstream reporting `real_tokens` would.

use std::io::{self, BufRead, BufWriter, Write};

use tiergate::estimate::{prompt_tokens_of_text, Estimator, Observed, RequestInfo};

fn main() -> anyhow::Result<()> {
    let learn = std::env::args().any(|a| a == "--learn");
    let estimator = Estimator::new(256, 16);
    let stdin = io::stdin().lock();
    let mut out = BufWriter::new(io::stdout().lock());
    for (i, line) in stdin.lines().enumerate() {
        let line = line?;
        if !learn {
            let text: String = serde_json::from_str(&line)?;
            writeln!(out, "{}", prompt_tokens_of_text(&text))?;
            continue;
        }
        let (text, real): (String, u64) = serde_json::from_str(&line)?;
        let info = RequestInfo {
            model: Some("m".into()),
            stream: false,
            client_wants_usage: false,
            prompt_tokens: prompt_tokens_of_text(&text),
            max_tokens: None,
            choices: 1,
            completes: false,
        };
        writeln!(out, "{}", estimator.estimate(1, &info).estimate)?;
        let observed = Observed {
            prompt: Some((info.prompt_tokens, real)),
            ..Observed::default()
        };
        estimator.observe_usage(1, "m", observed, i as u64);
    }
    out.flush()?;
    Ok(())
}
