# Runs attnkit-op (or another program: attnkit-qwen3's input checks) (EXE) with ARGS ('|'-separated, since ';' would split the -D argument) and checks
# the result, either
#  * EXPECT_RC and EXPECT_ERROR: the exit code, a regular expression that stderr must match, and
#    that the message is one line; or
#  * OUT, REF, TENSORS ('|'-separated), BOUND, CMP: exit code 0, and each named tensor of OUT is
#    within BOUND (relative L2) of the same tensor of REF, by attnkit-compare-tensors (CMP);
#    an entry NAME:X of TENSORS has its own bound X (integer tensors are always compared exactly).
#    With REF_ARGS, EXE runs with those arguments first (writing REF).
macro(run_op argstring)
  string(REPLACE "|" ";" _args "${argstring}")
  execute_process(COMMAND ${EXE} ${_args} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
endmacro()

if(DEFINED EXPECT_RC)
  run_op("${ARGS}")
  if(NOT rc EQUAL EXPECT_RC)
    message(FATAL_ERROR "exit code ${rc}, expected ${EXPECT_RC}; stderr: ${err}")
  endif()
  if(NOT err MATCHES "${EXPECT_ERROR}")
    message(FATAL_ERROR "stderr does not match '${EXPECT_ERROR}': ${err}")
  endif()
  string(STRIP "${err}" line)
  if(line MATCHES "\n")
    message(FATAL_ERROR "the error message is not one line: ${err}")
  endif()
  message(STATUS "${line}")
  return()
endif()

if(DEFINED REF_ARGS)
  run_op("${REF_ARGS}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "reference run failed (${rc}): ${err}")
  endif()
endif()
run_op("${ARGS}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "attnkit-op failed (${rc}): ${err}")
endif()
message(STATUS "${out}")
string(REPLACE "|" ";" tensors "${TENSORS}")
foreach(entry ${tensors})
  set(bound "${BOUND}")
  set(t "${entry}")
  if(entry MATCHES "^(.+):([^:]+)$")
    set(t "${CMAKE_MATCH_1}")
    set(bound "${CMAKE_MATCH_2}")
  endif()
  execute_process(COMMAND ${CMP} ${OUT}:${t} ${REF}:${t} ${bound} RESULT_VARIABLE rc OUTPUT_VARIABLE cmp
                  ERROR_VARIABLE cmp_err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "tensor '${t}' differs from ${REF}: ${cmp}${cmp_err}")
  endif()
  message(STATUS "${t}: ${cmp}")
endforeach()
