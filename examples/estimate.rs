//! Prints the prompt estimate of texts, for `bench/estimate`: reads one JSON string per line on
//! stdin and prints, per line, the tokens `tiergate::estimate::prompt_tokens_of_text` gives it.
//! The estimate is the gateway's own code, not a re-implementation.

use std::io::{self, BufRead, BufWriter, Write};

fn main() -> anyhow::Result<()> {
    let stdin = io::stdin().lock();
    let mut out = BufWriter::new(io::stdout().lock());
    for line in stdin.lines() {
        let text: String = serde_json::from_str(&line?)?;
        writeln!(out, "{}", tiergate::estimate::prompt_tokens_of_text(&text))?;
    }
    out.flush()?;
    Ok(())
}
