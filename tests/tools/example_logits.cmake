# Runs attnkit-qwen3 on a fixture with --logits-out and compares with the reference logits.
# With -DTRACE=ON it also writes --trace-out and --plot and checks the SVG; with -DTRACE=<name>
# it also compares the trace's tensor <name> with the reference's.
set(extra "")
if(TRACE)
  set(extra --trace-out ${OUT}.trace.safetensors --plot ${OUT}.svg)
endif()
execute_process(COMMAND ${EXE} --model ${FIXTURE} --ids-from ${FIXTURE}/reference.safetensors:input_ids
                        ${FLAG} --logits-out ${OUT} ${extra} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "attnkit-qwen3 failed (${rc})")
endif()
execute_process(COMMAND ${CMP} ${OUT}:logits ${FIXTURE}/reference.safetensors:logits 1e-4 RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "logits differ from the reference")
endif()
if(TRACE)
  if(NOT TRACE STREQUAL "ON")
    execute_process(COMMAND ${CMP} ${OUT}.trace.safetensors:${TRACE} ${FIXTURE}/reference.safetensors:${TRACE} 1e-4
                    RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR "trace tensor ${TRACE} differs from the reference")
    endif()
  endif()
  file(READ ${OUT}.svg svg)
  if(NOT svg MATCHES "^<\\?xml|^<svg" OR NOT svg MATCHES "</svg>")
    message(FATAL_ERROR "--plot did not write an SVG document")
  endif()
endif()
