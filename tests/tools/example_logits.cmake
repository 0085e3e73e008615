# Runs attnkit-qwen3 on a fixture with --logits-out and compares with the reference logits.
execute_process(COMMAND ${EXE} --model ${FIXTURE} --ids-from ${FIXTURE}/reference.safetensors:input_ids
                        ${FLAG} --logits-out ${OUT} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "attnkit-qwen3 failed (${rc})")
endif()
execute_process(COMMAND ${CMP} ${OUT}:logits ${FIXTURE}/reference.safetensors:logits 1e-4 RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "logits differ from the reference")
endif()
