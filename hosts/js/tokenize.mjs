// CLIP token ids as sdport/runtime/tokenizer.py makes them (docs/CONTRACT.md "Tokenization"):
// the folder's tokenizer.json through a `tokenizers`-compatible library, then
// [bos] + the first max_length - 2 ids + [eos], padded with the pad id to max_length.

const SPECIAL_DEFAULTS = {
  bos_token: '<|startoftext|>',
  eos_token: '<|endoftext|>',
  unk_token: '<|endoftext|>',
  pad_token: '<|endoftext|>',
};

function content(token) {
  return typeof token === 'string' ? token : token && token.content;
}

/**
 * @param {Function} Tokenizer the `Tokenizer` class of @huggingface/tokenizers
 * @param {object} tokenizerJson the folder's tokenizer/tokenizer.json
 * @param {object} configs tokenizer_config.json overlaid with special_tokens_map.json
 * @param {number} maxLength the manifest's max_tokens (77)
 */
export function clipTokenizer(Tokenizer, tokenizerJson, configs, maxLength) {
  const vocab = tokenizerJson.model && tokenizerJson.model.vocab;
  if (!vocab) throw new Error('tokenizer.json has no BPE vocabulary: not a CLIP tokenizer');
  const special = {};
  for (const [key, fallback] of Object.entries(SPECIAL_DEFAULTS)) special[key] = content(configs[key]) || fallback;
  const ids = {};
  for (const key of ['bos_token', 'eos_token', 'pad_token']) {
    ids[key] = vocab[special[key]];
    if (ids[key] === undefined) throw new Error(`${key} ${special[key]} is not in the vocabulary`);
  }
  // The special tokens are matched in the text before BPE, as the Python runtime registers
  // them (SD 2.x's pad token "!" then becomes id 0 wherever "!" appears).
  const json = structuredClone(tokenizerJson);
  const present = new Set((json.added_tokens || []).map((t) => t.content));
  for (const key of Object.keys(SPECIAL_DEFAULTS)) {
    const c = special[key];
    if (present.has(c) || vocab[c] === undefined) continue;
    json.added_tokens = [...(json.added_tokens || []), {
      id: vocab[c], content: c, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true,
    }];
    present.add(c);
  }
  json.truncation = null;
  json.padding = null;
  const tokenizer = new Tokenizer(json, configs);
  const room = maxLength - 2;
  return {
    bosId: ids.bos_token,
    eosId: ids.eos_token,
    padId: ids.pad_token,
    maxLength,
    /** int64 ids of one prompt as a BigInt64Array of maxLength. */
    encode(prompt) {
      // Rust lowercases char by char (U+03A3 -> U+03C3 always); JavaScript's toLowerCase
      // applies Unicode's Final_Sigma rule (a word-final capital sigma -> U+03C2). Capital
      // sigma is the only context-dependent default lowercase mapping, so mapping it first
      // makes the two agree.
      const text = prompt.replaceAll('\u03a3', '\u03c3');
      const body = tokenizer.encode(text, { add_special_tokens: false }).ids.slice(0, room);
      const out = new BigInt64Array(maxLength).fill(BigInt(ids.pad_token));
      out[0] = BigInt(ids.bos_token);
      body.forEach((id, i) => { out[i + 1] = BigInt(id); });
      out[body.length + 1] = BigInt(ids.eos_token);
      return out;
    },
  };
}
