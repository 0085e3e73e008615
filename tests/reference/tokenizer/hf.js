#!/usr/bin/env node
// Hugging Face `tokenizers` (the Rust library transformers uses, through its Node bindings) behind
// attnkit-tokenize's command line, so compare.js, bench-tokenizer.sh and people can run either:
//   hf.js --tokenizer tokenizer.json [--json | --decode | --bench N] [FILE]   (stdin without FILE)
// It also exports load() (for compare.js) and main() (lenml.js reuses the command line).
'use strict';
// One thread like attnkit-tokenize --bench: rayon reads these when the native module starts its pool,
// so they are set before anything loads it.
process.env.RAYON_NUM_THREADS = '1';
process.env.TOKENIZERS_PARALLELISM = 'false';
const fs = require('fs');

// {encode(text) -> ids, decode(ids) -> text}, both async. Encoding adds nothing around the text
// (HF's encode(text, add_special_tokens=False)); added tokens in the text are still matched.
function load(tokenizerPath) {
  const { Tokenizer } = require('tokenizers');
  const t = Tokenizer.fromFile(tokenizerPath);
  return {
    encode: async (text) => (await t.encode(text, null, { addSpecialTokens: false })).getIds(),
    decode: (ids) => t.decode(ids, false),
  };
}

// Ids as attnkit-tokenize --decode reads them: whitespace- or comma-separated, or a JSON array.
function parseIds(s) {
  const body = s.trim().replace(/^\[([^]*)\]$/, '$1');
  const words = body.split(/[\s,]+/).filter((w) => w !== '');
  return words.map((w) => {
    if (!/^\d+$/.test(w)) throw new Error(`not a token id: '${w.slice(0, 40)}'`);
    return Number(w);
  });
}

const median = (xs) => [...xs].sort((a, b) => a - b)[xs.length >> 1];

async function main(name, loadFn) {
  const usage = (msg) => {
    process.stderr.write(`${name}: error: ${msg}\n` +
      `usage: ${name} --tokenizer tokenizer.json [--json | --decode | --bench N] [FILE]\n`);
    process.exit(2);
  };
  const fail = (msg) => { process.stderr.write(`${name}: error: ${msg}\n`); process.exit(1); };
  const argv = process.argv.slice(2);
  let tokenizerPath, json = false, decode = false, bench = 0, file;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--tokenizer' && i + 1 < argv.length) tokenizerPath = argv[++i];
    else if (a === '--json') json = true;
    else if (a === '--decode') decode = true;
    else if (a === '--bench' && i + 1 < argv.length) {
      bench = Number(argv[++i]);
      if (!Number.isInteger(bench) || bench < 1) usage(`--bench: expected a count >= 1, got '${argv[i]}'`);
    } else if (a.startsWith('--')) usage(`unknown option or missing value '${a}'`);
    else if (file === undefined) file = a;
    else usage(`unexpected argument '${a}'`);
  }
  if (tokenizerPath === undefined) usage('--tokenizer tokenizer.json is required');

  let tok, input;
  try { tok = loadFn(tokenizerPath); } catch (e) { fail(`${tokenizerPath}: ${e.message}`); }
  try { input = fs.readFileSync(file ?? 0); } catch (e) { fail(`${file ?? 'stdin'}: ${e.message}`); }

  if (decode) {
    let ids;
    try { ids = parseIds(input.toString('latin1')); } catch (e) { fail(e.message); }
    process.stdout.write(await tok.decode(ids));
    return;
  }
  // Raw bytes in; a lossy decode would hand the tokenizer U+FFFD where attnkit-tokenize errors.
  const text = input.toString('utf8');
  if (!Buffer.from(text, 'utf8').equals(input)) fail(`${file ?? 'stdin'}: input is not valid UTF-8`);
  if (bench > 0) {
    const seconds = [];
    let ids;
    for (let i = 0; i < bench; i++) {
      const t0 = process.hrtime.bigint();
      ids = await tok.encode(text);
      seconds.push(Number(process.hrtime.bigint() - t0) / 1e9);
    }
    const mbs = input.length / 1e6 / median(seconds);
    process.stdout.write(`encode: ${mbs.toFixed(2)} MB/s (${input.length} bytes, ${ids.length} tokens, median of ${bench})\n`);
    return;
  }
  const ids = await tok.encode(text);
  process.stdout.write(json ? JSON.stringify(ids) + '\n' : ids.join(' ') + '\n');
}

module.exports = { load, main, parseIds };
if (require.main === module) main('hf.js', load);
